"""Every experiment config builds, is locked and names only known stages/objectives; the
paper-scale configs' update steps lower on 8 fake CPU devices, and compile at full depth and
length on the device count they are meant for (`launch.fit`), fitting 80 GiB per device, so
shape, sharding and memory bugs show before renting accelerators.

Abstract batches use the configs' own row counts, a 512-token prompt and `max_new_tokens`
(8192) of completion.
"""

import functools
import importlib
import inspect
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bridge import abstract, advantages, losses, runtime, sharding, stages, tasks, train_state
from bridge.mesh import make_mesh
from bridge.stages import erpd, opd, self_distill, sft

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for p in (ROOT / "configs").rglob("*.py") if "def get_config(" in p.read_text())
PAPER_MODULES = ("configs.sparse_to_dense.qwen3_1p7b_math", "configs.sparse_to_dense.llama31_8b_math")
PROMPT_LEN = 512


def variant_args(module) -> list[str]:
    rows = getattr(module, "ROWS", {})
    return ["", *module.VARIANTS, *(f"{scale},{row}" for scale in ("toy", "smoke") for row in rows)]


CASES = [(name, arg) for name in CONFIG_MODULES for arg in variant_args(importlib.import_module(name))]


def test_every_family_module_is_an_experiment():
    """configs/<family>/<name>.py are experiments (get_config); shared helpers live in configs/."""
    for path in (ROOT / "configs").glob("*/*.py"):
        if path.name != "__init__.py":
            assert "def get_config(" in path.read_text(), path


def test_config_modules_found():
    assert set(PAPER_MODULES) | {"configs.sparse_to_dense.toy"} <= set(CONFIG_MODULES)


def check_stage(c, name: str, s) -> None:
    stages.kind(s.kind)
    assert s.model in c.models, f"{name}: model slot {s.model!r}"
    assert s.steps > 0 and s.optimizer.lr > 0
    train_state.make_optimizer(s.optimizer)
    if s.kind == "rl":
        params = inspect.signature(losses.POLICY_LOSSES[s.loss]).parameters
        unknown = set(s.loss_kwargs) - set(params)
        assert not unknown, f"{name}: loss_kwargs {sorted(unknown)} are not arguments of the {s.loss!r} loss"
        assert s.aggregation in losses.AGGREGATIONS
        assert s.kl_kind in losses.KL_ESTIMATORS and s.kl_mode in ("loss", "reward")
        advantages.advantage_estimator(s.advantage)
        assert (s.prompts_per_step * s.sampling.n) % s.minibatches == 0
    elif s.kind == "erpd_teacher":
        assert s.teacher_loss in erpd.TEACHER_LOSSES and s.init
        assert (s.prompts_per_step * s.sampling.n) % s.minibatches == 0
    elif s.kind == "erpd_distill":
        erpd.check_distill(name, s)
        assert (s.prompts_per_step * s.sampling.n) % s.minibatches == 0
    elif s.kind == "self_distill":
        self_distill.check(name, s)
        assert (s.prompts_per_step * s.sampling.n) % s.minibatches == 0
    elif s.kind == "sft":
        assert s.loss in sft.SFT_LOSSES and s.source in ("gold", "teacher")
        if s.source == "teacher" or s.loss != "cross_entropy":
            assert s.teacher in c.models
    else:
        assert s.loss in opd.PG_LOSSES + opd.FULL_LOSSES and s.advantage_norm in ("none", "whiten")
        teachers = opd.teacher_refs(s)
        assert set(teachers) <= set(c.models)
        opd.teacher_weights(name, s)
        assert (s.prompts_per_step * s.sampling.n) % s.minibatches == 0


@pytest.mark.parametrize("module,arg", CASES)
def test_config_builds_locked_and_valid(module, arg):
    c = importlib.import_module(module).get_config(arg or None)
    with pytest.raises(AttributeError, match="stepz"):
        c.stages[runtime.pipeline_units(c)[0][0].stage].stepz = 3
    with pytest.raises(AttributeError, match="nope"):
        c.nope = 1
    with pytest.raises(AttributeError):
        c.eval.tempreature = 0.7
    units = runtime.pipeline_units(c)
    assert units
    for unit, scfg, _ in units:
        check_stage(c, unit.id, scfg)
    if c.pipeline.name == "sparse_to_dense":
        assert c.pipeline.c1_stage in ("", *c.pipeline.stages) and c.pipeline.c2_stage in ("", *c.pipeline.stages)
    assert {"n", "temperature", "top_p", "top_k"} <= set(c.eval)
    tasks.get_task(c.task.name, **c.task.options.to_dict())  # option names match the task factory
    for slot in c.models.values():
        assert slot.hf_dir or slot.arch  # where the weights (or the from-scratch init) come from


def test_unknown_variant_is_named():
    for module in CONFIG_MODULES:
        with pytest.raises(ValueError, match="tpyo"):
            importlib.import_module(module).get_config("tpyo")


# Published parameter counts (model cards / safetensors index totals).
PUBLISHED = {
    ("configs.sparse_to_dense.qwen3_1p7b_math", "teacher"): ("non_embedding", 6.95e9),  # Qwen3-8B
    ("configs.sparse_to_dense.qwen3_1p7b_math", "student"): ("non_embedding", 1.4e9),  # Qwen3-1.7B
    ("configs.sparse_to_dense.llama31_8b_math", "teacher"): ("total", 70.55e9),  # Llama-3.3-70B
    ("configs.sparse_to_dense.llama31_8b_math", "student"): ("total", 8.03e9),  # Llama-3.1-8B
}


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_paper_architectures_match_published_sizes(key):
    module, slot = key
    c = importlib.import_module(module).get_config()
    model = abstract.abstract_model(c, slot)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    embeddings = model.config.vocab_size * model.config.hidden_size * (1 if model.config.tie_word_embeddings else 2)
    kind, expected = PUBLISHED[key]
    count = total - embeddings if kind == "non_embedding" else total
    assert abs(count - expected) / expected < 0.01, (slot, count, expected)
    assert jax.tree.leaves(nnx.state(model))[0].dtype == jnp.float32  # master weights (param_dtype)


def fit_mesh(shape, n: int = 8):
    """The config's mesh on n devices: fixed axes shrink so the -1 axis keeps at least 2."""
    assert -1 in shape
    return make_mesh(tuple(-1 if s == -1 else math.gcd(s, n // 2) for s in shape))


@functools.cache
def paper_setup(module: str):
    """Config, 8-device mesh, rules and abstract models."""
    c = importlib.import_module(module).get_config("bridge")
    return c, fit_mesh(tuple(c.mesh.shape)), sharding.as_rules(c.mesh.rules), abstract.abstract_models(c)


STAGE_CASES = [(m, name) for m in PAPER_MODULES for name in importlib.import_module(m).get_config().pipeline.stages]


@pytest.mark.parametrize("module,name", STAGE_CASES)
def test_paper_update_step_lowers(module, name):
    c, mesh, rules, models = paper_setup(module)
    update, args = abstract.stage_update(c, name, mesh, rules, models, prompt_len=PROMPT_LEN)
    with sharding.use_mesh(mesh, rules):
        lowered = update.lower(*args)
    out_state, metrics = lowered.out_info
    assert jax.tree.map(lambda x: x.shape, out_state) == jax.tree.map(lambda x: x.shape, args[0])
    assert {"loss", "grad_norm", "update_skipped"} <= set(metrics)


# Where each paper config is meant to run: devices (80 GiB H100s) it must fit.
PAPER_DEVICES = {"configs.sparse_to_dense.qwen3_1p7b_math": 8,  # one 8-GPU host
                 "configs.sparse_to_dense.llama31_8b_math": 64,  # eight 8-GPU hosts (70B teacher)
                 "configs.erpd.qwen3_4b_math": 8}  # one 8-GPU host, 33k-token rows


@pytest.mark.parametrize("module", sorted(PAPER_DEVICES))
def test_paper_config_compiles_and_fits_its_devices(module):
    """Every program of every stage (update, rollout prefill and decode, scoring) at full depth
    and 8.7k tokens per row, compiled (never run) on the fake device count of its deployment:
    arguments + temporaries <= 80 GiB per device (about a minute)."""
    config = module.replace(".", "/") + ".py"
    result = subprocess.run([sys.executable, "-m", "launch.fit", f"--config={config}",
                             f"--devices={PAPER_DEVICES[module]}", "--hbm_gib=80"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [[x.strip() for x in line.strip("| \n").split("|")] for line in result.stdout.splitlines()
            if line.startswith("| ") and "stage" not in line]
    programs = {(r[0], r[1]) for r in rows}
    c = importlib.import_module(module).get_config()
    for unit, scfg, _ in runtime.pipeline_units(c):
        want = {"update"} | ({"sample prefill", "sample decode"} if stages.kind(scfg.kind).sampling(scfg) else set())
        assert {(unit.stage, p) for p in want} <= programs, unit.stage
    assert all(r[-1] == "yes" for r in rows)


def test_fit_reports_a_config_that_does_not_fit():
    """Qwen3-1.7B GRPO alone needs about 33 GiB per device on 8 devices (decoding): not 8 GiB."""
    result = subprocess.run([sys.executable, "-m", "launch.fit", "--config=configs/sparse_to_dense/qwen3_1p7b_math.py:direct_grpo",
                             "--devices=8", "--hbm_gib=8"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert result.returncode == 1 and "over 8 GiB per device: student_rl update" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_paper_config_smoke_scale_runs(tmp_path):
    """The paper structure at smoke scale through the launcher (1-2 minutes on 2 busy cores)."""
    result = subprocess.run([sys.executable, "-m", "launch.train",
                             "--config=configs/sparse_to_dense/qwen3_1p7b_math.py:smoke",
                             f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["stages"]) == ["teacher_sft", "teacher_rl", "student_sft", "warmup", "opd", "student_rl"]
