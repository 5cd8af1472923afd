"""The sparse-to-dense bridge: RL the teacher, forward-KL warmup, on-policy distillation into
the student, optional student RL; baselines and ablations are other stage lists.

The two conditions for the bridge to pay off are measured and logged:
  C1: the teacher's accuracy after RL (greedy, held-out prompts) -- `c1_stage`'s evaluation;
  C2: the teacher-student KL on student rollouts before OPD -- the sampled reverse-KL
      estimate (`teacher_reverse_kl_sampled`) at the first step of `c2_stage`, taken before
      any update.
"""

from __future__ import annotations

from bridge import metrics as metrics_lib


def summarize(cfg, workdir: str, results: dict) -> dict:
    """C1 and C2 of the stages that ran (a pipeline cut short by `pipeline.stages` has neither)."""
    summary = {}
    if cfg.pipeline.get("c1_stage") in results:
        summary["c1_teacher_accuracy_after_rl"] = results[cfg.pipeline.c1_stage].get("accuracy")
    records = metrics_lib.read_metrics(workdir) if cfg.pipeline.get("c2_stage") else {}
    if cfg.pipeline.get("c2_stage") in records:
        first = next(r for r in records[cfg.pipeline.c2_stage] if r["step"] == 1)
        summary["c2_teacher_student_kl_before_opd"] = first["teacher_reverse_kl_sampled"]
    return summary
