"""`system.memory_fraction` -> XLA_PYTHON_CLIENT_MEM_FRACTION, set by the launchers before JAX's
backend starts (no GPU needed: the variable is what the GPU client reads)."""

import subprocess
import sys
from pathlib import Path

import pytest

from bridge import distributed

REPO = Path(__file__).resolve().parents[1]

VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"


@pytest.fixture
def env(monkeypatch):
    """os.environ without the variable; whatever the test sets is undone afterwards."""
    import os

    monkeypatch.setenv(VAR, "unset")
    monkeypatch.delenv(VAR)
    return os.environ


def test_the_fraction_sets_the_variable_and_an_explicit_one_wins(env):
    distributed.set_memory_fraction(0.0)
    assert VAR not in env  # 0: JAX's default
    distributed.set_memory_fraction(0.6)
    assert env[VAR] == "0.6"
    distributed.set_memory_fraction(0.9)
    assert env[VAR] == "0.6"  # already in the environment: it wins
    with pytest.raises(ValueError, match=r"system.memory_fraction must be in \[0, 1\]"):
        distributed.set_memory_fraction(1.5)


# Runs a launcher's main as `python -m launch.<name>` does, its next step after setting the
# fraction replaced by printing the variable and whether JAX's backend had started.
_LAUNCH = """
import os, sys
from absl import app
from jax._src import xla_bridge
import bridge, {module}
from launch import cli, {launcher}

def stop(*args, **kw):
    print("SEEN", os.environ.get("{var}"), xla_bridge.backends_are_initialized())
    sys.exit(0)

{module}.{function} = stop
sys.argv = ["{launcher}", *sys.argv[1:]]
app.run({launcher}.main, flags_parser=cli.parse_flags)
"""


def _launch(launcher, module, function, *args):
    """[the variable's value, whether the backend had started] when the launcher called `function`."""
    code = _LAUNCH.format(launcher=launcher, module=module, function=function, var=VAR)
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("SEEN ")[-1].split()


def test_launch_train_sets_it_before_the_backend_starts(env, tmp_path):
    args = ("--config=configs/sparse_to_dense/toy.py:smoke", f"--workdir={tmp_path}")
    assert _launch("train", "bridge.distributed", "initialize", *args,
                   "--config.system.memory_fraction=0.55") == ["0.55", "False"]


def test_launch_reproduce_sets_it_from_the_family_config(env, tmp_path):
    family = tmp_path / "family" / "toy.py"
    family.parent.mkdir()
    family.write_text("from configs.sparse_to_dense import toy\n"
                      "reproduction = toy.reproduction\n"
                      "def get_config(arg=None):\n"
                      "    c = toy.get_config(arg)\n"
                      "    with c.unlocked():\n"
                      "        c.system.memory_fraction = 0.45\n"
                      "    return c\n")
    assert _launch("reproduce", "bridge.reproduce", "reproduce", f"--config={family}:smoke",
                   f"--workdir={tmp_path / 'runs'}", f"--outdir={tmp_path / 'results'}") == ["0.45", "False"]


def test_launch_eval_sets_it_from_its_config(env, tmp_path):
    from bridge import models
    from stage_helpers import tiny_decoder

    tokenizer = models.char_tokenizer("0123456789+=")
    models.save_hf(tiny_decoder(tokenizer), str(tmp_path / "model"), tokenizer=tokenizer)
    assert _launch("eval", "launch.eval", "_mesh", f"--checkpoint={tmp_path / 'model'}", f"--outdir={tmp_path / 'out'}",
                   "--config=configs/sparse_to_dense/toy.py:smoke", "--config.system.memory_fraction=0.35") == ["0.35", "False"]
