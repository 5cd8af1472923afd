"""Toy self-distillation with privileged context on CPU: the bridge toy's 2-layer student after
SFT on 4-digit addition (greedy 0.57 on held-out training problems; 30% of its SFT prompts carry
contexts, see `read_contexts`) is the base; it then trains on the hard split, 5-digit addition,
where the base never succeeds (greedy and avg@8 at T = 1 both 0.000, measured), so GRPO gets no
reward to learn from, while the base given the reference answer in its prompt (OPSD's teacher)
scores 0.40 greedy (0.065 avg@8 at T = 1) and given a hint, a critique or SDPO's feedback 0.000.

    python -m launch.train --config=configs/self_distill/toy.py:opsd --workdir=/tmp/sd_opsd
    python -m launch.train --config=configs/self_distill/toy.py:srpo,smoke --workdir=/tmp/sd_smoke

The README's table trains the base once (`--config.pipeline.stages='("student_sft",)'`) and
starts every row from it (`--config.models.student.hf_dir=<base>/models/student_sft` and the
row's stage alone).

arg: comma-separated variants.
  scale:    toy (default) | smoke (seconds, for tests)
  method:   opsd (default: the reference answer in the teacher's prompt) | sdpo (the verdict on
            the student's answer and a correct answer of its group) | hint (the answer up to the
            first wrong digit) | critique (the first failing column, "a+b+carry=total") | srpo
            (correct samples to GRPO, failed ones to SDPO-context self-distillation) | grpo (the
            baseline: the rl stage alone) | ghpo (GRPO plus GHPO's adaptive guidance: a group with
            no correct sample is sampled again after the first 25%, 50%, 75% of its answer) |
            proxy (proxy-tuning: `configs/self_distill/proxy.py`, its expert, anti-expert and
            base) | distill (proxy with its base_distill stage)
  teacher:  frozen (default) | live | ema
  loss:     jsd (default, beta 0.5) | sampled (sampled-token reverse KL as a dense advantage) |
            rkl | fkl | ce (DistIL forward cross-entropy) | topk (reverse KL over the teacher's
            top 4 plus a tail bucket)
  base:     read_contexts (default): 30% of the base's SFT prompts carry a context
            (`bridge.tasks.base.with_context_prompts`): half of those about a synthetic failed
            4-digit attempt in every mode, half a 5-digit problem whose context holds its answer
            (opsd, or sdpo with a correct peer), so the base copies an answer from a context at
            the hard length, as a pretrained LM can, without being taught 5-digit addition; the
            last 256 SFT prompts (the stopping rule's check) stay plain.
            plain_base: no contexts in SFT; its self-teacher cannot read one (measured: 0.000
            with any context on 5 digits).
The contexts are written in the prompt's characters ("=" between context and prompt), so the
tokenizer, and with it the base, is the bridge toy's.
"""

from configs import common
from configs.self_distill import proxy
from configs.sparse_to_dense import toy

METHODS = ("opsd", "sdpo", "hint", "critique", "srpo", "grpo", "ghpo")
TEACHERS = ("frozen", "live", "ema")
LOSSES = {"jsd": {}, "sampled": dict(loss="sampled_reverse_kl", advantage_norm="whiten"),
          "rkl": dict(loss="reverse_kl"), "fkl": dict(loss="forward_kl"), "ce": dict(loss="forward_ce"),
          "topk": dict(loss="reverse_kl", divergence_top_k=4)}
VARIANTS = ("toy", "smoke", "read_contexts", "plain_base", "proxy", "distill", *METHODS, *TEACHERS, *LOSSES)
# Long carry chains (min_carries=4) were not hard: the base scores 0.50 on them. 8192 train
# prompts: STEPS x 32 never repeat one.
HARD = common.cd(digits=5, num_train=8192)
STEPS = 100  # 100 x 32 prompts x 8 samples: one row in ~5 min on 2 shared cores


def get_config(arg=None):
    parts = common.parse_arg(arg, VARIANTS)
    if "proxy" in parts or "distill" in parts:
        return proxy.get_config(",".join(p for p in parts if p in proxy.VARIANTS))
    smoke = "smoke" in parts
    method = next((p for p in parts if p in METHODS), "opsd")
    base = toy.get_config("smoke" if smoke else None)
    base.unlock()
    c = common.base()
    for key in ("tokenizer", "task", "eval", "checkpoint", "metrics"):
        c[key] = base[key]
    c.task.options.update(HARD if not smoke else dict(HARD, num_train=c.task.options.num_train))
    c.models.student = base.models.student
    c.stages.student_sft = base.stages.student_sft
    c.stages.student_sft.task_options.digits = 4  # the base learns the plain task
    if "plain_base" not in parts:  # the base reads contexts, answers in them at the hard length too
        c.stages.student_sft.task_options.update(context_prompts=0.3, context_digits=c.task.options.digits,
                                                 plain_last=c.stages.student_sft.check_prompts)
        if not smoke:  # 600 steps with half the prompts carrying contexts left it at 0.0 (measured)
            c.stages.student_sft.update(steps=1200)
            c.stages.student_sft.task_options.num_train = 1200 * 128 + 256
    gen = common.sampling(8, max_new_tokens=8)
    if method in ("grpo", "ghpo"):
        c.stages.student_rl = common.rl_stage("student", 3e-4, STEPS, sampling=gen)
        c.stages.student_rl.guidance.enabled = method == "ghpo"
        train = c.stages.student_rl
    else:
        c.stages.self_distill = common.self_distill_stage(
            "student", 3e-4, STEPS, sampling=gen, context="sdpo" if method == "srpo" else method,
            route="srpo" if method == "srpo" else "", teacher=next((p for p in parts if p in TEACHERS), "frozen"),
            context_tokens=16)
        for variant in (p for p in parts if p in LOSSES):
            c.stages.self_distill.update(LOSSES[variant])
        train = c.stages.self_distill
    c.pipeline.stages = ("student_sft", "student_rl" if method in ("grpo", "ghpo") else "self_distill")
    if smoke:
        train.update(steps=3, prompts_per_step=4)
        train.sampling.n = 4
    c.lock()
    return c


def reproduction(arg=None) -> dict:
    """`launch.reproduce`'s table (bridge/reproduce/__init__.py): the hard split's rows from one
    shared base per seed (the context-reading SFT student): GRPO, GRPO + guidance (GHPO), OPSD,
    SDPO, hints, critiques, SRPO. Evaluated greedy and avg@16 at T = 1 on the 5-digit test split
    and on the 4-digit task the base was trained on."""
    common.parse_arg(arg, VARIANTS)
    rows = {"base": dict(label="base (SFT, reads contexts)", variant="opsd", unit="student_sft")}
    for method, label in (("grpo", "GRPO"), ("ghpo", "GRPO + guidance (GHPO)"), ("opsd", "OPSD"),
                          ("sdpo", "SDPO"), ("hint", "hindsight hints"), ("critique", "step critiques"),
                          ("srpo", "SRPO")):
        rows[method] = dict(label=label, variant=method,
                            unit="student_rl" if method in ("grpo", "ghpo") else "self_distill")
    return dict(seeds=(0, 1, 2), rows=rows, evals=dict(test={}, four_digits=dict(digits=4)),
                sampling=dict(n=16, temperature=1.0, top_p=1.0, top_k=0), prompts=500,
                validation=dict(seed=1), curve_every=10, kl_reference="student_sft", skills=("student_sft",))
