"""Command-line mistakes end in one clear line and exit 2, never a traceback (through
`python -m launch.train` in a subprocess, as a user runs it)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(tmp_path, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "launch.train", *args, f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, named", [
    (["--config=configs/sparse_to_dense/nope.py"], "configs/sparse_to_dense/nope.py"),
    (["--config", "configs/nope.py:smoke"], "configs/nope.py"),
    (["--config=configs/sparse_to_dense/toy.py:tpyo"], "tpyo"),
    (["--config=configs/sparse_to_dense/toy.py:smoke", "--config.stages.nostage.steps=3"], "nostage"),
    (["--config=configs/sparse_to_dense/toy.py:smoke", "--config.seed=abc"], "config.seed"),
])
def test_command_line_mistake_is_one_line(tmp_path, args, named):
    proc = _train(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert named in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a command that never started
