"""A config's update steps compiled against abstract shapes: does it fit, before renting?

Every trained stage's jitted update (the one `bridge.stages` builds: same loss function,
optimizer, micro-batching and shardings) is lowered and compiled on the config's mesh with
`jax.ShapeDtypeStruct` arguments, so no weights are read and no memory is allocated;
`compiled.memory_analysis()` then gives the per-device argument and temporary bytes.

On CPU with fake devices (`--xla_force_host_platform_device_count`), XLA computes bfloat16
through float32 in places, so the numbers lean high for bf16 configs: a fit here is a fit
on the accelerator, with margin. `python -m launch.fit` prints the table.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bridge import sharding, train_state
from bridge.models import Decoder, ModelConfig
from bridge.models.config import dtype_from_name
from bridge.stages import common, opd, rl, sft


def abstract_model(c, slot: str, **override) -> Decoder:
    """The slot's model (config `arch` plus the run's dtypes, remat and scan), shapes only."""
    arch = dict(c.models[slot].arch, **override)
    cfg = ModelConfig(**arch, dtype=dtype_from_name(c.dtype), param_dtype=dtype_from_name(c.param_dtype),
                      remat=bool(c.get("remat", False)), scan_layers=bool(c.get("scan_layers", False)))
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def update_rows(scfg) -> int:
    """Rows in one optimizer update of a stage."""
    if scfg.kind == "sft":
        return int(scfg.batch_size)
    return int(scfg.prompts_per_step * scfg.group_size // scfg.minibatches)


def batch_shapes(scfg, rows: int, prompt_len: int, completion: int) -> dict:
    """name -> (shape, dtype) of the batch a stage's update step takes."""
    i32, f32 = jnp.int32, jnp.float32
    tokens = (rows, completion)
    shapes = {"prompt_tokens": ((rows, prompt_len), i32), "prompt_mask": ((rows, prompt_len), bool),
              "tokens": (tokens, i32), "mask": (tokens, bool)}
    if scfg.kind == "rl":
        shapes.update(old_logp=(tokens, f32), advantages=((rows,), f32), row_weight=((rows,), f32),
                      tis_weight=(tokens, f32))
        if scfg.kl_coef > 0:
            shapes["ref_logp"] = (tokens, f32)
    if scfg.kind == "opd":
        shapes.update(old_logp=(tokens, f32), advantages=(tokens, f32), token_weight=(tokens, f32))
    return shapes


def _spec_like(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def stage_update(c, name: str, mesh, rules, models: dict, *, prompt_len: int, completion: int | None = None):
    """(jitted update, abstract (state, batch, frozen)) of stage `name` on `mesh`."""
    s = c.stages[name]
    graphdef, params = nnx.split(models[s.model])
    tx = train_state.make_optimizer(s.optimizer)
    state = jax.eval_shape(lambda p: train_state.init_state(p, tx), params)
    state_sharding = train_state.state_shardings(state, mesh, rules)
    frozen = None
    if s.kind == "rl":
        loss_fn = rl.make_loss_fn(s)
        weight = common.token_count("row_weight") if s.aggregation == "token-mean" else train_state.rows
    elif s.kind == "sft":
        teacher_graphdef, frozen = nnx.split(models[s.teacher])
        loss_fn, weight = sft.make_loss_fn(s, teacher_graphdef), common.token_count()
    else:
        refs = [s.teacher, *s.extra_teachers]
        split = [nnx.split(models[r]) for r in refs]
        weights = list(s.teacher_weights) or [1.0 / len(refs)] * len(refs)
        loss_fn, frozen = opd.make_loss_fn(s, [g for g, _ in split], weights), [t for _, t in split]
        weight = common.token_count("token_weight")
    if frozen is not None:
        frozen = _spec_like(frozen, sharding.state_shardings(frozen, mesh, rules))
    update = train_state.make_update_step(graphdef, loss_fn, tx, state_sharding=state_sharding,
                                          microbatches=s.microbatches, microbatch_weight=weight)
    rows = update_rows(s)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))
             for k, (shape, dtype) in batch_shapes(s, rows, prompt_len, completion or s.max_new_tokens).items()}
    return update, (_spec_like(state, state_sharding), batch, frozen)


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Per-device bytes of one compiled update step (GiB) and how long it took to build."""

    stage: str
    rows: int
    microbatches: int
    tokens_per_row: int
    arguments_gib: float
    temp_gib: float
    whole_arguments_gib: float  # all devices together
    lower_s: float
    compile_s: float

    @property
    def total_gib(self) -> float:
        return self.arguments_gib + self.temp_gib


def _gib(n: float) -> float:
    return n / 2**30


def stage_memory(c, name: str, mesh, rules, models: dict, *, prompt_len: int,
                 completion: int | None = None) -> StageMemory:
    """Compiles stage `name`'s update step against abstract shapes and reads its memory."""
    update, args = stage_update(c, name, mesh, rules, models, prompt_len=prompt_len, completion=completion)
    with sharding.use_mesh(mesh, rules):
        t0 = time.perf_counter()
        lowered = update.lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    analysis = compiled.memory_analysis()
    whole = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(args))
    s = c.stages[name]
    return StageMemory(stage=name, rows=update_rows(s), microbatches=int(s.microbatches),
                       tokens_per_row=prompt_len + (completion or s.max_new_tokens),
                       arguments_gib=_gib(analysis.argument_size_in_bytes), temp_gib=_gib(analysis.temp_size_in_bytes),
                       whole_arguments_gib=_gib(whole), lower_s=t1 - t0, compile_s=t2 - t1)


def abstract_models(c, **override) -> dict:
    return {slot: abstract_model(c, slot, **override) for slot in c.models}
