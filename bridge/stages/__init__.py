"""Training stages, one module each, chosen by a stage config's `kind`.

Each module exposes `build(ctx, name, cfg) -> runtime.StageProgram`; `bridge.runtime.run_stage`
drives it (resume, checkpoints, metrics, export).
"""

from bridge.stages import opd, rl, sft

BUILDERS = {"rl": rl.build, "sft": sft.build, "opd": opd.build}


def builder(kind: str):
    if kind not in BUILDERS:
        raise ValueError(f"Unknown stage kind {kind!r}; choose one of {sorted(BUILDERS)}.")
    return BUILDERS[kind]
