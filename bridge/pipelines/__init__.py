"""Pipeline summaries, chosen by `config.pipeline.name`; the driver is `runtime.run_pipeline`.

    "stages"           the results of every unit, nothing more
    "sparse_to_dense"  plus the bridge's C1/C2 conditions (`sparse_to_dense.summarize`)
    "erpd"             plus the paper's table and KL-efficiency plot (`erpd.summarize`)
"""

import json
import os

from bridge import distributed, metrics as metrics_lib, runtime
from bridge.pipelines import erpd, sparse_to_dense

SUMMARIES = {"stages": lambda cfg, workdir, results: {}, "sparse_to_dense": sparse_to_dense.summarize,
             "erpd": erpd.summarize}


def run(cfg, workdir: str) -> dict:
    """Runs (or resumes) the pipeline; returns and writes (results.json) its summary."""
    if cfg.pipeline.name not in SUMMARIES:
        raise ValueError(f"Unknown pipeline {cfg.pipeline.name!r}; choose one of {sorted(SUMMARIES)}.")
    ctx = runtime.run_pipeline(cfg, workdir)
    summary = {"stages": ctx.results, "final": list(ctx.results.values())[-1] if ctx.results else {}}
    if not distributed.is_main():  # process 0 of a multi-host run writes the summary and plots
        return summary
    summary.update(SUMMARIES[cfg.pipeline.name](cfg, workdir, ctx.results))
    if cfg.metrics.plots:
        summary["plots"] = metrics_lib.plot_curves(workdir)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
