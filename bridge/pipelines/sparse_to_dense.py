"""The sparse-to-dense bridge: RL the teacher, forward-KL warmup, on-policy distillation into
the student, optional student RL; baselines and ablations are other stage lists.

The two conditions for the bridge to pay off are measured and logged:
  C1: the teacher's accuracy after RL (greedy, held-out prompts) -- `c1_stage`'s evaluation;
  C2: the teacher-student KL on student rollouts before OPD -- the sampled reverse-KL
      estimate at the first step of `c2_stage`, taken before any update.
"""

from __future__ import annotations

import json
import os

from bridge import metrics as metrics_lib, runtime, stages


def run(cfg, workdir: str) -> dict:
    """Runs (or resumes) every stage in cfg.pipeline.stages; returns and writes the summary."""
    for name in cfg.pipeline.stages:
        if name not in cfg.stages:
            raise ValueError(f"Pipeline stage {name!r} is not defined in config.stages "
                             f"(defined: {', '.join(sorted(cfg.stages))}).")
        stages.builder(cfg.stages[name].kind)  # fail on an unknown kind before any work
    ctx = runtime.make_context(cfg, workdir)
    try:
        for name in cfg.pipeline.stages:
            runtime.run_stage(ctx, name, cfg.stages[name], stages.builder(cfg.stages[name].kind))
    finally:
        ctx.writer.close()
    summary = summarize(cfg, workdir, ctx.results)
    if cfg.metrics.plots:
        summary["plots"] = metrics_lib.plot_curves(workdir)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def summarize(cfg, workdir: str, results: dict) -> dict:
    records = metrics_lib.read_metrics(workdir)
    summary = {"stages": results, "final": results.get(cfg.pipeline.stages[-1], {}) if cfg.pipeline.stages else {}}
    if cfg.pipeline.c1_stage:
        summary["c1_teacher_accuracy_after_rl"] = results[cfg.pipeline.c1_stage].get("accuracy")
    if cfg.pipeline.c2_stage:
        first = next(r for r in records[cfg.pipeline.c2_stage] if r["step"] == 1)
        summary["c2_teacher_student_kl_before_opd"] = first["teacher_kl"]
    return summary
