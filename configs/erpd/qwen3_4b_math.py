"""ERPD at the paper's scale: Qwen3-4B-Thinking-2507 base on MATH, one 8-GPU host (FSDP).

    python -m launch.train --config=configs/erpd/qwen3_4b_math.py --workdir=/ckpt/erpd
    python -m launch.train --config=configs/erpd/qwen3_4b_math.py:mse,s2 ...
    python -m launch.fit --config=configs/erpd/qwen3_4b_math.py --devices=8 --hbm_gib=80

arg: the variants of `configs/erpd/toy.py` (teacher loss: ce | grpo | sapo | mse; strategy:
s1 | s2 | s3 | ensemble | current; schedule: iterative | no_distill | switching), applied to
the paper's sizes: one fixed batch of 1,000 prompts x 16 rollouts at T = 0.6 with up to
32,768 new tokens; the teacher trains 48 updates on minibatches of 64 rows (dozens of steps:
about a fifth of an epoch), the distillation 16 updates (one epoch or less); lr 1e-6.
"""

from configs import common, sparse_to_dense_paper as paper
from configs.erpd import toy

VARIANTS = tuple(v for v in toy.VARIANTS if v not in ("toy", "smoke"))
MAX_NEW_TOKENS = 32768
BASE = paper.model("Qwen3-4B-Thinking-2507", **paper.qwen3(
    hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
    tie_word_embeddings=True, rope_theta=5_000_000.0, max_position_embeddings=262144))


def get_config(arg=None):
    c = toy.get_config(arg)  # the structure and variants; sizes below
    with c.unlocked():
        c.dtype, c.param_dtype = "bfloat16", "float32"
        c.remat, c.scan_layers = True, True
        c.mesh.shape = (1, -1, 1)
        c.tokenizer = ""  # the base's hf_dir (runtime.tokenizer_spec)
        c.task = common.cd(name="math", options=common.cd(train_path=f"{paper.DATA_DIR}/train.jsonl",
                                                          test_path=f"{paper.DATA_DIR}/math500.jsonl", chat=True,
                                                          system_prompt=""))
        c.models = common.cd(student=BASE, erpd_teacher=BASE)
        c.pipeline.stages = tuple(s for s in c.pipeline.stages if s != "student_sft")  # the base is trained
        gen = common.sampling(16, temperature=0.6, max_new_tokens=MAX_NEW_TOKENS)
        opt = common.optimizer(1e-6, b2=0.999, weight_decay=0.01)
        for name, steps in (("erpd_teacher", 48), ("erpd_distill", 16)):
            s = c.stages[name]
            # 16,000 rows: 250 minibatches of 64; 8 micro-batches of 8 rows, one row per device.
            s.update(steps=steps, prompts_per_step=1000, minibatches=250, microbatches=8, optimizer=opt,
                     sample_batch_size=2)  # 32 rollouts of 33k tokens decode at once
            s.sampling = gen
        c.stages.erpd_teacher.update(snapshot_steps=(20,), track_every=4)
        c.stages.erpd_distill.unlearned = c.stages.erpd_distill.weak = "artifact:erpd_teacher/step20"
        if "student_rl" in c.stages:
            c.stages.student_rl.update(prompts_per_step=64, sample_batch_size=4, minibatches=4, microbatches=16,
                                       optimizer=opt)
            c.stages.student_rl.sampling = common.sampling(8, temperature=0.6, max_new_tokens=MAX_NEW_TOKENS)
        del c.stages["student_sft"]
        # launch.fit, 8 x 80 GiB: the evaluation decode of 32 prompts x 16 samples x 33k tokens needs
        # 320 GiB; 4 is the largest power of two that fits (the largest batch that fits is 7)
        c.eval.update(num_prompts=500, batch_size=4, max_new_tokens=MAX_NEW_TOKENS, n=16, temperature=0.6,
                      top_p=0.95, top_k=20, kl_reference="hf:" + BASE.hf_dir)
        c.checkpoint.every = 8
    return c
