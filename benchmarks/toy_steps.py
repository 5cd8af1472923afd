"""Per-step wall and CPU time of each stage of the toy bridge (configs/sparse_to_dense/toy.py),
for before/after comparisons of the runtime's speed on a shared machine.

    .venv/bin/python benchmarks/toy_steps.py [--stages=teacher_sft,teacher_rl] [--steps=12]
        [--root=DIR] [--json=out.json]

Each stage is built as the pipeline builds it (fresh seeded models, a temporary workdir), runs
`--warm` steps (compiles), then `--steps` timed steps; an SFT stage's held-out checks (every
`check_every` steps) are timed apart (the last one: the first compiles the greedy sampler). `--root` runs another checkout's code (e.g. an unpacked
`git archive` of an older commit) with this script, so two trees can take turns under the same
load. CPU time (user + system of this process, all threads) is steadier than wall time when
other jobs share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

STAGES = ("teacher_sft", "teacher_rl", "student_sft", "warmup", "opd", "student_rl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.root))
    import numpy as np

    from bridge import metrics as metrics_lib, runtime, sharding, stages
    from configs.sparse_to_dense import toy

    cfg = toy.get_config("")
    with cfg.unlocked():
        cfg.metrics.tensorboard = False
        cfg.metrics.progress = False
    ctx = runtime.make_context(cfg, tempfile.mkdtemp(prefix="toy_steps_"))
    out = {}
    for stage in args.stages.split(","):
        scfg = cfg.stages[stage]
        unit = runtime.Unit(stage)
        ctx.current = unit
        t0 = time.perf_counter()
        program = stages.kind(scfg.kind).build(ctx, unit, scfg)
        build_s = time.perf_counter() - t0
        state, walls, cpus, checks = program.state, [], [], []
        with sharding.use_mesh(ctx.mesh, ctx.rules):
            for i in range(args.warm + args.steps):
                w0, c0 = time.perf_counter(), time.process_time()
                state, metrics = program.step(state, i)
                metrics = metrics_lib.to_floats(metrics)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                if i < args.warm:
                    continue
                (checks if "validation_accuracy" in metrics else walls).append(wall)
                if "validation_accuracy" not in metrics:
                    cpus.append(cpu)
        ctx.slots[scfg.model] = stages.kind(scfg.kind).policy_of(
            __import__("flax").nnx.merge(program.graphdef, state.params))
        row = {"build_s": round(build_s, 2), "step_wall_s": round(float(np.median(walls)), 4),
               "step_cpu_s": round(float(np.median(cpus)), 4),
               "check_wall_s": round(checks[-1], 4) if len(checks) > 1 else None,  # the first compiles
               "load": round(os.getloadavg()[0], 1)}
        out[stage] = row
        print(stage, row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
