"""Running `python -m launch.train` in a subprocess, as a user does, and reading its records."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Timings and memory differ between two runs of the same computation; everything else must match.
VOLATILE_SUFFIXES = ("_s", "_per_s", "_gib")


def train_cmd(config, workdir, *overrides):
    return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}", *overrides]


def run_train(config, workdir, *overrides, timeout=900):
    return subprocess.run(train_cmd(config, workdir, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def stable_records(workdir) -> list[dict]:
    """metrics.jsonl without the volatile (timing, memory) fields."""
    records = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(VOLATILE_SUFFIXES)} for r in records]
