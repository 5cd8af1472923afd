"""Metrics: one JSON line per step in <workdir>/metrics.jsonl, TensorBoard scalars, optional
Weights & Biases, and PNG curves per stage at the end.

Each line is {"stage": name, "step": i, <metric>: float, ...}: a step record, or an evaluation
record (eval_* metrics, written with `replace=True`). On resume the lines of the stage past the
restored step are dropped and an evaluation repeated after a kill replaces the earlier one, so
an interrupted-and-resumed run leaves the same file as a straight one: one line per (stage,
step, kind).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict

import numpy as np


def to_floats(metrics: dict) -> dict:
    """Device scalars -> Python floats (one host transfer for the whole dict)."""
    import jax

    host = jax.device_get(metrics)
    return {k: float(np.asarray(v)) for k, v in host.items() if np.ndim(v) == 0}


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, wandb_project: str | None = None,
                 run_name: str | None = None, active: bool = True):
        """`active=False` (the processes other than 0 of a multi-host run): writes nothing."""
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.active = active
        self.tb = None
        if tensorboard and active:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.wandb = None
        if wandb_project and active:
            self.wandb = wandb_run(workdir, wandb_project, run_name or os.path.basename(os.path.abspath(workdir)))
        self._wandb_stages = set()

    def _drop(self, dropped) -> None:
        """Rewrites the file without the records for which `dropped(record)` is true, and without
        a line cut short by a kill mid-write."""
        if not self.active or not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not dropped(record):
                    keep.append(line)
        with open(self.path, "w") as f:
            f.writelines(keep)

    def truncate(self, stage: str, last_step: int) -> None:
        """Drops lines of `stage` with step > last_step (used when resuming)."""
        self._drop(lambda r: r["stage"] == stage and r["step"] > last_step)

    def write(self, stage: str, step: int, metrics: dict, *, replace: bool = False) -> None:
        """Appends one record; with `replace`, first drops an earlier record of the same stage,
        step and kind (evaluation or step), e.g. the evaluation of a unit killed while exporting."""
        record = {"stage": stage, "step": int(step), **to_floats(metrics)}
        if not self.active:
            return
        if replace:
            self._drop(lambda r: r["stage"] == stage and r["step"] == record["step"]
                       and _is_eval(r) == _is_eval(record))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("stage", "step"):
                    self.tb.add_scalar(f"{stage}/{k}", v, step)
        if self.wandb is not None:
            if stage not in self._wandb_stages:  # each stage's curves against its own step
                self.wandb.define_metric(f"{stage}/step")
                self.wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self._wandb_stages.add(stage)
            self.wandb.log({f"{stage}/{k}": v for k, v in record.items() if k != "stage"})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


WANDB_ID = "wandb_run_id"


def wandb_run(workdir: str, project: str, name: str):
    """The workdir's Weights & Biases run (`pip install -e '.[wandb]'`): its id is made at the
    first start and kept in <workdir>/wandb_run_id, so a resumed run continues the same W&B run
    (`resume="allow"`); W&B's own files go to <workdir>/wandb/. WANDB_MODE=offline logs without
    a network (`wandb sync` uploads later)."""
    import wandb  # optional dependency, only when configured

    path = os.path.join(workdir, WANDB_ID)
    if os.path.exists(path):
        with open(path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:16]
        with open(path, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(project=project, name=name, id=run_id, dir=workdir, resume="allow")


def _is_eval(record: dict) -> bool:
    return any(key.startswith("eval_") for key in record)


def read_metrics(workdir: str) -> dict[str, list[dict]]:
    """stage -> list of step records, in file order."""
    out: dict[str, list[dict]] = defaultdict(list)
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    out[record["stage"]].append(record)
    return dict(out)


PLOTTED = ("reward", "accuracy", "held_out_accuracy", "loss", "kl_ref", "teacher_reverse_kl_sampled", "forward_kl", "entropy", "response_length",
           "clip_frac_high", "grad_norm", "eval_accuracy")


def plot_curves(workdir: str) -> list[str]:
    """One PNG per stage with a panel per metric present in PLOTTED; returns the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    for stage, records in read_metrics(workdir).items():
        keys = [k for k in PLOTTED if any(k in r for r in records)]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        fig.suptitle(stage)
        fig.tight_layout()
        path = os.path.join(workdir, "plots", f"{stage}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
