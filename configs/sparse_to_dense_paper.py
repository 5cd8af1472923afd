"""The paper-scale sparse-to-dense configs' shared structure: rows, stages, scales.

Rows (the paper's table; `arg` picks one, default bridge):
  bridge       teacher_rl -> warmup -> opd -> student_rl
  direct_grpo  student_rl only (GRPO on the student, the baseline)
  raw_teacher  warmup -> opd -> student_rl (teacher not RL-trained)
  no_warmup    teacher_rl -> opd -> student_rl
  no_opd       teacher_rl -> warmup -> student_rl
Scales: paper (default: Hugging Face checkpoints under MODELS_DIR, MATH under DATA_DIR), toy
(toy.py's tiny models, task and stage sizes in this structure, plus the SFT pretraining
those from-scratch models need; minutes on CPU) and smoke (toy.py's smoke sizes; seconds).
Override paths on the command line, e.g. --config.models.teacher.hf_dir=/ckpt/Qwen3-8B.

Paper-scale stage sizes are chosen, not tuned: GRPO with token-mean aggregation, group 8,
64 prompts per step in 4 optimizer minibatches, lr 1e-6, 8192 new tokens; params are kept in
float32 (compute in bfloat16) because a bfloat16 weight near 0.02 moves in steps of ~1e-4,
so lr-1e-6 Adam updates would round away.
"""

import copy

import ml_collections

from configs import common
from configs.sparse_to_dense import toy

MODELS_DIR = "/models"
DATA_DIR = "/data/math"  # MATH train split and MATH-500, one {"problem", "solution"|"answer"} per line
ROWS = {
    "bridge": ("teacher_rl", "warmup", "opd", "student_rl"),
    "direct_grpo": ("student_rl",),
    "raw_teacher": ("warmup", "opd", "student_rl"),
    "no_warmup": ("teacher_rl", "opd", "student_rl"),
    "no_opd": ("teacher_rl", "warmup", "student_rl"),
}
SCALES = ("toy", "smoke")
VARIANTS = SCALES + tuple(ROWS)
# Stage keys a toy/smoke scale takes from toy.py; every other stage key keeps this structure.
SCALE_KEYS = ("steps", "optimizer", "prompts_per_step", "sampling", "minibatches", "microbatches", "batch_size",
              "pool_prompts", "sample_batch_size")


def model(name: str, **arch) -> ml_collections.ConfigDict:
    """A model slot: its checkpoint folder and its published architecture (config.json)."""
    return common.cd(hf_dir=f"{MODELS_DIR}/{name}", arch=common.cd(**arch))


def qwen3(**kw) -> dict:
    """Qwen3's architecture defaults, overridden by `kw` (rope_theta, context length, ...)."""
    return {"family": "qwen3", "qk_norm": True, "vocab_size": 151936, "head_dim": 128, "rope_theta": 1_000_000.0,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, **kw}


def llama3(**kw) -> dict:
    rope = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192))
    return dict(family="llama", vocab_size=128256, head_dim=128, rope_theta=500_000.0, rope_scaling=rope,
                rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False, **kw)


def bridge_config(arg, *, teacher, student, mesh_shape, eval_sampling: dict, enable_thinking=None,
                  eval_batch_size: int = 32):
    """The bridge experiment for one teacher/student pair (`model` slots); the locked config.
    enable_thinking: the chat template's thinking switch (Qwen3 hybrid models), None: absent."""
    lr, max_new_tokens = 1e-6, 8192
    parts = common.parse_arg(arg, VARIANTS)
    row = next((p for p in parts if p in ROWS), "bridge")
    c = common.base()
    c.dtype, c.param_dtype = "bfloat16", "float32"
    c.remat, c.scan_layers = True, True  # 8k-token rollouts; one compiled block for 28-80 layers
    c.mesh.shape = mesh_shape
    c.tokenizer = ""  # the student's hf_dir (runtime.tokenizer_spec): it follows an override of the folder
    # system_prompt and enable_thinking are fields, so a run sets them from the command line.
    c.task = common.cd(name="math", options=common.cd(train_path=f"{DATA_DIR}/train.jsonl",
                                                      test_path=f"{DATA_DIR}/math500.jsonl", chat=True,
                                                      system_prompt=""))
    if enable_thinking is not None:
        c.task.options.enable_thinking = enable_thinking
    c.models.teacher, c.models.student = copy.deepcopy(teacher), copy.deepcopy(student)
    opt = lambda lr: common.optimizer(lr, b2=0.999, weight_decay=0.01)  # noqa: E731  (one per stage)
    # 128 rows per optimizer update (RL), 64 (OPD, warmup): micro-batches of 8 rows, one
    # 8.7k-token row per device on an 8-way batch axis, keep activations to one sequence.
    # Rollouts are sampled 128 rows at a time (the KV cache of one chunk is alive at once).
    rl = dict(prompts_per_step=64, sampling=common.sampling(8, max_new_tokens=max_new_tokens), sample_batch_size=16,
              minibatches=4, microbatches=16)
    c.stages.teacher_rl = common.rl_stage("teacher", lr, 200, optimizer=opt(lr), **rl)
    c.stages.warmup = common.sft_stage("student", 1e-5, 128, teacher="teacher", pool_prompts=2048,
                                       sampling=common.sampling(4, max_new_tokens=max_new_tokens), sample_batch_size=32,
                                       batch_size=64, microbatches=8, optimizer=opt(1e-5))
    c.stages.opd = common.opd_stage("student", lr, 100, teacher="teacher", prompts_per_step=64,
                                    sampling=common.sampling(4, max_new_tokens=max_new_tokens), sample_batch_size=32,
                                    minibatches=4, microbatches=8, optimizer=opt(lr))
    c.stages.student_rl = common.rl_stage("student", lr, 200 if row == "direct_grpo" else 100,
                                          optimizer=opt(lr), **rl)
    c.pipeline.name = "sparse_to_dense"
    c.pipeline.stages = ROWS[row]
    c.pipeline.c1_stage = "teacher_rl" if "teacher_rl" in ROWS[row] else ""
    c.pipeline.c2_stage = "opd" if "opd" in ROWS[row] else ""
    c.eval.update(num_prompts=500, batch_size=eval_batch_size, max_new_tokens=max_new_tokens, **eval_sampling)
    c.checkpoint.every = 20
    if "toy" in parts or "smoke" in parts:
        _toy_scale(c, toy.get_config(",".join([p for p in parts if p == "smoke"] + [row])))
    c.lock()
    return c


def _toy_scale(c, t) -> None:
    """toy.py's models, task, eval and stage sizes in this config's stage structure; toy.py's
    from-scratch SFT stages (teacher_sft, student_sft) come first, as in toy.py's rows."""
    for key in ("dtype", "param_dtype", "remat", "scan_layers", "mesh", "tokenizer", "task", "models", "eval", "checkpoint", "metrics"):
        c[key] = t[key]
    for name, stage in t.stages.items():
        if name in c.stages:
            c.stages[name].update({k: stage[k] for k in SCALE_KEYS if k in stage})
        else:
            c.stages[name] = stage
    c.pipeline.stages = t.pipeline.stages
