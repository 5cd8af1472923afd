"""Toy self-distillation with privileged context on CPU: the bridge toy's student after SFT
(4-digit addition; greedy accuracy 0.502) is the base; it then trains on the hard split,
5-digit addition, where the base never succeeds (avg@8 and pass@8 both 0.000 on 1000 test
problems at T = 1, measured), so GRPO gets no reward to learn from; by one of:

    python -m launch.train --config=configs/self_distill/toy.py:opsd --workdir=/tmp/sd_opsd
    python -m launch.train --config=configs/self_distill/toy.py:srpo,smoke --workdir=/tmp/sd_smoke

arg: comma-separated variants.
  scale:    toy (default) | smoke (seconds, for tests)
  method:   opsd (default: the reference answer in the teacher's prompt) | sdpo (the verdict on
            the student's answer and a correct answer of its group) | hint (the answer up to the
            first wrong digit) | critique (the first failing column, "a+b+carry=total") | srpo
            (correct samples to GRPO, failed ones to SDPO-context self-distillation) | grpo (the
            baseline: the rl stage alone)
  teacher:  frozen (default) | live | ema
  loss:     jsd (default, beta 0.5) | sampled (sampled-token reverse KL as a dense advantage) |
            rkl | fkl | ce (DistIL forward cross-entropy) | topk (reverse KL over the teacher's
            top 4 plus a tail bucket)
  base:     read_contexts: half of the base's SFT prompts carry a context about a synthetic
            failed attempt (`bridge.tasks.base.with_context_prompts`). Without it the base has
            never seen a context, and its self-teacher cannot read one (a pretrained LM can).
The contexts are written in the prompt's characters ("=" between context and prompt), so the
tokenizer, and with it the base, is the bridge toy's.
"""

from configs import common
from configs.sparse_to_dense import toy

METHODS = ("opsd", "sdpo", "hint", "critique", "srpo", "grpo")
TEACHERS = ("frozen", "live", "ema")
LOSSES = {"jsd": {}, "sampled": dict(loss="sampled_reverse_kl", advantage_norm="whiten"),
          "rkl": dict(loss="reverse_kl"), "fkl": dict(loss="forward_kl"), "ce": dict(loss="forward_ce"),
          "topk": dict(loss="reverse_kl", divergence_top_k=4)}
VARIANTS = ("toy", "smoke", "read_contexts", *METHODS, *TEACHERS, *LOSSES)
HARD = common.cd(digits=5)  # long carry chains (min_carries=4) were not hard: the base scores 0.50 on them


def get_config(arg=None):
    parts = common.parse_arg(arg, VARIANTS)
    smoke = "smoke" in parts
    method = next((p for p in parts if p in METHODS), "opsd")
    base = toy.get_config("smoke" if smoke else None)
    base.unlock()
    c = common.base()
    for key in ("tokenizer", "task", "eval", "checkpoint", "metrics"):
        c[key] = base[key]
    c.task.options.update(HARD)
    c.models.student = base.models.student
    c.stages.student_sft = base.stages.student_sft
    c.stages.student_sft.task_options.digits = 4  # the base learns the plain task
    c.stages.student_sft.task_options.context_prompts = 0.5 if "read_contexts" in parts else 0.0
    gen = common.sampling(8, max_new_tokens=8)
    if method == "grpo":
        c.stages.student_rl = common.rl_stage("student", 3e-4, 200, sampling=gen)
        train = c.stages.student_rl
    else:
        c.stages.self_distill = common.self_distill_stage(
            "student", 3e-4, 200, sampling=gen, context="sdpo" if method == "srpo" else method,
            route="srpo" if method == "srpo" else "", teacher=next((p for p in parts if p in TEACHERS), "frozen"),
            context_tokens=16)
        for variant in (p for p in parts if p in LOSSES):
            c.stages.self_distill.update(LOSSES[variant])
        train = c.stages.self_distill
    c.pipeline.stages = ("student_sft", "student_rl" if method == "grpo" else "self_distill")
    if smoke:
        train.update(steps=3, prompts_per_step=4)
        train.sampling.n = 4
    c.lock()
    return c
