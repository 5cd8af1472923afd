"""Compositions of stages, chosen by `config.pipeline.name`."""

from bridge.pipelines import sparse_to_dense

PIPELINES = {"sparse_to_dense": sparse_to_dense.run}


def run(cfg, workdir: str) -> dict:
    if cfg.pipeline.name not in PIPELINES:
        raise ValueError(f"Unknown pipeline {cfg.pipeline.name!r}; choose one of {sorted(PIPELINES)}.")
    return PIPELINES[cfg.pipeline.name](cfg, workdir)
