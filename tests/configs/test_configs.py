"""Every experiment config builds, is locked and names only known stages/objectives; the
paper-scale configs' update steps lower (and compile, in the slow suite) against abstract
shapes on 8 fake CPU devices, so shape and sharding bugs show before renting accelerators.

Abstract batches use the configs' own row counts and a 512-token prompt; the completion is
`max_new_tokens` (8192) for lowering. Compiling (slow suite) keeps every width, head count,
vocabulary, dtype and the mesh but cuts the models to COMPILE_LAYERS layers and the
completion to COMPILE_COMPLETION tokens: XLA:CPU did not finish compiling the full-depth
Qwen3-8B GRPO step in 10 minutes (16 GB resident), while 2 layers take about 10 s a stage.
"""

import functools
import importlib
import inspect
import json
import math
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bridge import advantages, losses, sharding, stages, tasks, train_state
from bridge.mesh import make_mesh
from bridge.models import Decoder, ModelConfig
from bridge.models.config import dtype_from_name
from bridge.stages import opd, rl, sft

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for p in (ROOT / "configs").rglob("*.py") if "def get_config(" in p.read_text())
PAPER_MODULES = ("configs.sparse_to_dense.qwen3_1p7b_math", "configs.sparse_to_dense.llama31_8b_math")
PROMPT_LEN = 512
COMPILE_COMPLETION = 1024
COMPILE_LAYERS = 2


def variant_args(module) -> list[str]:
    rows = getattr(module, "ROWS", {})
    return ["", *module.VARIANTS, *(f"{scale},{row}" for scale in ("toy", "smoke") for row in rows)]


CASES = [(name, arg) for name in CONFIG_MODULES for arg in variant_args(importlib.import_module(name))]


def test_config_modules_found():
    assert set(PAPER_MODULES) | {"configs.sparse_to_dense.toy"} <= set(CONFIG_MODULES)


def check_stage(c, name: str, s) -> None:
    stages.builder(s.kind)
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
        assert (s.prompts_per_step * s.group_size) % s.minibatches == 0
    elif s.kind == "sft":
        assert s.loss in sft.SFT_LOSSES and s.source in ("gold", "teacher")
        if s.source == "teacher" or s.loss != "cross_entropy":
            assert s.teacher in c.models
    else:
        assert s.loss in opd.PG_LOSSES + opd.FULL_LOSSES and s.advantage_norm in ("none", "whiten")
        teachers = [s.teacher, *s.extra_teachers]
        assert set(teachers) <= set(c.models)
        assert len(s.teacher_weights) in (0, len(teachers))
        assert (s.prompts_per_step * s.group_size) % s.minibatches == 0


@pytest.mark.parametrize("module,arg", CASES)
def test_config_builds_locked_and_valid(module, arg):
    c = importlib.import_module(module).get_config(arg or None)
    with pytest.raises(AttributeError, match="stepz"):
        c.stages[c.pipeline.stages[0]].stepz = 3
    with pytest.raises(AttributeError, match="nope"):
        c.nope = 1
    with pytest.raises(AttributeError):
        c.eval.tempreature = 0.7
    assert c.pipeline.stages and set(c.pipeline.stages) <= set(c.stages)
    for name in c.pipeline.stages:
        check_stage(c, name, c.stages[name])
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


def abstract_model(c, slot: str, **override):
    arch = dict(c.models[slot].arch, **override)
    cfg = ModelConfig(**arch, dtype=dtype_from_name(c.dtype), param_dtype=dtype_from_name(c.param_dtype),
                      remat=c.remat, scan_layers=c.scan_layers)
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_paper_architectures_match_published_sizes(key):
    module, slot = key
    c = importlib.import_module(module).get_config()
    model = abstract_model(c, slot)
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


def spec_like(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def batch_specs(mesh, rules, rows: int, completion: int, stage_kind: str, scfg) -> dict:
    i32, f32 = jnp.int32, jnp.float32
    shapes = {"prompt_tokens": ((rows, PROMPT_LEN), i32), "prompt_mask": ((rows, PROMPT_LEN), bool),
              "tokens": ((rows, completion), i32), "mask": ((rows, completion), bool)}
    if stage_kind == "rl":
        shapes.update(old_logp=((rows, completion), f32), advantages=((rows,), f32), row_weight=((rows,), f32),
                      tis_weight=((rows, completion), f32))
        if scfg.kl_coef > 0:
            shapes["ref_logp"] = ((rows, completion), f32)
    if stage_kind == "opd":
        shapes.update(old_logp=((rows, completion), f32), advantages=((rows, completion), f32),
                      token_weight=((rows, completion), f32))
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))
            for k, (shape, dtype) in shapes.items()}


def stage_update(c, name: str, mesh, rules, models: dict, completion: int | None = None):
    """(jitted update, abstract args) of stage `name`, exactly as bridge.stages.* build them."""
    s = c.stages[name]
    graphdef, params = nnx.split(models[s.model])
    tx = train_state.make_optimizer(s.optimizer)
    state = jax.eval_shape(lambda p: train_state.init_state(p, tx), params)
    state_sharding = train_state.state_shardings(state, mesh, rules)
    frozen = None
    if s.kind == "rl":
        loss_fn, rows = rl.make_loss_fn(s), s.prompts_per_step * s.group_size // s.minibatches
    elif s.kind == "sft":
        teacher_graphdef, teacher = nnx.split(models[s.teacher])
        loss_fn, rows, frozen = sft.make_loss_fn(s, teacher_graphdef), s.batch_size, teacher
    else:
        refs = [s.teacher, *s.extra_teachers]
        split = [nnx.split(models[r]) for r in refs]
        weights = list(s.teacher_weights) or [1.0 / len(refs)] * len(refs)
        loss_fn = opd.make_loss_fn(s, [g for g, _ in split], weights)
        rows, frozen = s.prompts_per_step * s.group_size // s.minibatches, [t for _, t in split]
    if frozen is not None:
        frozen = spec_like(frozen, sharding.state_shardings(frozen, mesh, rules))
    update = train_state.make_update_step(graphdef, loss_fn, tx, state_sharding=state_sharding,
                                          microbatches=s.microbatches)
    batch = batch_specs(mesh, rules, rows, completion or s.max_new_tokens, s.kind, s)
    return update, (spec_like(state, state_sharding), batch, frozen)


@functools.cache
def paper_setup(module: str, num_layers: int | None = None):
    """Config, 8-device mesh, rules and abstract models (optionally cut to num_layers layers)."""
    c = importlib.import_module(module).get_config("bridge")
    mesh = fit_mesh(tuple(c.mesh.shape))
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in c.mesh.rules)
    override = {} if num_layers is None else {"num_layers": num_layers}
    return c, mesh, rules, {slot: abstract_model(c, slot, **override) for slot in c.models}


STAGE_CASES = [(m, name) for m in PAPER_MODULES for name in importlib.import_module(m).get_config().pipeline.stages]


@pytest.mark.parametrize("module,name", STAGE_CASES)
def test_paper_update_step_lowers(module, name):
    c, mesh, rules, models = paper_setup(module)
    update, args = stage_update(c, name, mesh, rules, models)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = update.lower(*args)
    print(f"{module.split('.')[-1]} {name}: lower {time.perf_counter() - t0:.1f}s")
    out_state, metrics = lowered.out_info
    assert jax.tree.map(lambda x: x.shape, out_state) == jax.tree.map(lambda x: x.shape, args[0])
    assert {"loss", "grad_norm", "update_skipped"} <= set(metrics)


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("module,name", STAGE_CASES)
def test_paper_update_step_compiles(module, name):
    """Full width, heads and vocabulary, COMPILE_LAYERS layers (XLA:CPU needs many minutes and
    tens of GB for the full depth); every big weight shards 8 ways, so the per-device arguments
    are about 1/8 of the whole (a replicated state would be 8x that)."""
    c, mesh, rules, models = paper_setup(module, COMPILE_LAYERS)
    update, args = stage_update(c, name, mesh, rules, models, completion=COMPILE_COMPLETION)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = update.lower(*args).compile()
    per_device, whole = compiled.memory_analysis().argument_size_in_bytes, nbytes(args)
    print(f"{module.split('.')[-1]} {name}: lower+compile {time.perf_counter() - t0:.1f}s; "
          f"arguments {per_device / 2**30:.2f} GiB per device of {whole / 2**30:.2f} GiB")
    assert per_device < 1.25 * whole / mesh.size, (per_device, whole)  # unused args are pruned


@pytest.mark.slow
def test_paper_config_smoke_scale_runs(tmp_path):
    """The paper structure at smoke scale through the launcher (1-2 minutes on 2 busy cores)."""
    result = subprocess.run([sys.executable, "-m", "launch.train",
                             "--config=configs/sparse_to_dense/qwen3_1p7b_math.py:smoke",
                             f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["stages"]) == ["teacher_sft", "teacher_rl", "student_sft", "warmup", "opd", "student_rl"]
