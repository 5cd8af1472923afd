"""A config's jitted programs compiled against abstract shapes: does it fit, before renting?

For every trained stage: the update step (the one `bridge.stages` builds: same loss function,
optimizer, micro-batching and shardings), the rollout sampler's prefill and decode for one
sampling chunk, and the teacher-forced scoring pass over a rollout batch. Each is lowered and
compiled on the config's mesh with `jax.ShapeDtypeStruct` arguments, so no weights are read
and no memory is allocated; `compiled.memory_analysis()` gives per-device argument and
temporary bytes (arguments a program donates are counted once).

On CPU with fake devices (`--xla_force_host_platform_device_count`), XLA computes bfloat16
through float32 in places, so the numbers lean high for bf16 configs: a fit here is a fit
on the accelerator, with margin. `python -m launch.fit` prints the table.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bridge import sampling, scoring, sharding, train_state
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
        shapes.update(old_logp=(tokens, f32), advantages=(tokens, f32), token_weight=(tokens, f32),
                      tis_weight=(tokens, f32))
    return shapes


def _spec_like(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def stage_update(c, name: str, mesh, rules, models: dict, *, prompt_len: int):
    """(jitted update, abstract (state, batch, frozen)) of stage `name` on `mesh`."""
    s = c.stages[name]
    graphdef, params = nnx.split(models[s.model])
    tx = train_state.make_optimizer(s.optimizer)
    state = jax.eval_shape(lambda p: train_state.init_state(p, tx), params)
    state_sharding = train_state.state_shardings(state, mesh, rules)
    frozen = None
    if s.kind == "rl":
        loss_fn = rl.make_loss_fn(s)
        weight = rl.microbatch_weight(s)
    elif s.kind == "sft":
        teacher_graphdef, frozen = nnx.split(models[s.teacher])
        loss_fn, weight = sft.make_loss_fn(s, teacher_graphdef), sft.MICROBATCH_WEIGHT
    else:
        refs = [s.teacher, *s.extra_teachers]
        split = [nnx.split(models[r]) for r in refs]
        weights = opd.teacher_weights(name, s, len(refs))
        loss_fn, frozen = opd.make_loss_fn(s, [g for g, _ in split], weights), [t for _, t in split]
        weight = opd.MICROBATCH_WEIGHT
    if frozen is not None:
        frozen = _spec_like(frozen, sharding.state_shardings(frozen, mesh, rules))
    update = train_state.make_update_step(graphdef, loss_fn, tx, state_sharding=state_sharding,
                                          microbatches=s.microbatches, microbatch_weight=weight)
    rows = update_rows(s)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))
             for k, (shape, dtype) in batch_shapes(s, rows, prompt_len, int(s.max_new_tokens)).items()}
    return update, (_spec_like(state, state_sharding), batch, frozen)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Per-device GiB of one compiled program of a stage and how long it took to build."""

    stage: str
    program: str  # "update", "sample prefill", "sample decode", "score"
    rows: int  # rows in one call
    tokens_per_row: int
    arguments_gib: float
    temp_gib: float
    compile_s: float

    @property
    def total_gib(self) -> float:
        return self.arguments_gib + self.temp_gib


def _measure(stage: str, program: str, rows: int, tokens: int, jitted, args, mesh, rules) -> ProgramMemory:
    with sharding.use_mesh(mesh, rules):
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
    m = compiled.memory_analysis()
    return ProgramMemory(stage, program, rows, tokens, m.argument_size_in_bytes / 2**30, m.temp_size_in_bytes / 2**30,
                         time.perf_counter() - t0)


def _sampling_setup(s):
    """(model slot, prompts per sampling call, samples per prompt) of a stage's rollouts."""
    if s.kind == "sft":
        return s.teacher, int(s.sample_batch_size), int(s.samples_per_prompt)
    return s.model, int(s.get("sample_batch_size", 0) or s.prompts_per_step), int(s.group_size)


def sampler_programs(c, name: str, mesh, rules, models: dict, *, prompt_len: int) -> list[ProgramMemory]:
    """The rollout sampler of stage `name` (prefill, then the decode loop) for one chunk."""
    s = c.stages[name]
    slot, prompts, n = _sampling_setup(s)
    config = sampling.SamplingConfig(max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature),
                                     top_p=float(s.top_p), n=n)
    graphdef, state = nnx.split(models[slot])
    states = (_spec_like(state, sharding.state_shardings(state, mesh, rules)),)
    rows_spec = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))
    tokens, mask = rows_spec((prompts, prompt_len), jnp.int32), rows_spec((prompts, prompt_len), bool)
    prefill = jax.jit(functools.partial(sampling.prefill, (graphdef,), config=config, mesh=mesh, rules=rules))
    with sharding.use_mesh(mesh, rules):
        caches, logits = jax.eval_shape(prefill, states, tokens, mask)
    r = prompts * n
    decode = jax.jit(lambda st, caches, logits, prompt_mask, live, rng: sampling.decode(
        (graphdef,), st, caches, logits, prompt_mask, rng, config, live=live, mesh=mesh, rules=rules)[0],
        donate_argnums=(1,))
    decode_args = (states, caches, logits, rows_spec((r, prompt_len), bool), rows_spec((r,), bool),
                   jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    total = prompt_len + int(s.max_new_tokens)
    return [_measure(name, "sample prefill", prompts, prompt_len, prefill, (states, tokens, mask), mesh, rules),
            _measure(name, "sample decode", r, total, decode, decode_args, mesh, rules)]


def scoring_program(c, name: str, mesh, rules, models: dict, *, prompt_len: int, slot: str) -> ProgramMemory:
    """The teacher-forced scoring pass of model `slot` over one rollout batch of an RL/OPD
    stage (old logprobs of the policy; the teachers' logprobs in OPD)."""
    s = c.stages[name]
    rows = int(s.prompts_per_step * s.group_size)
    graphdef, state = nnx.split(models[slot])
    fn = scoring.in_slices(lambda st, b: scoring.completion_logprobs(nnx.merge(graphdef, st), b, 1.0,
                                                                      return_entropy=True),
                           common.scoring_slices(s))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))
             for k, (shape, dtype) in batch_shapes(s, rows, prompt_len, int(s.max_new_tokens)).items()
             if k in ("prompt_tokens", "prompt_mask", "tokens", "mask")}
    state = _spec_like(state, sharding.state_shardings(state, mesh, rules))
    program = "score" if slot == s.model else f"score {slot}"
    return _measure(name, program, rows, prompt_len + int(s.max_new_tokens), jax.jit(fn), (state, batch), mesh, rules)


def update_program(c, name: str, mesh, rules, models: dict, *, prompt_len: int) -> ProgramMemory:
    update, args = stage_update(c, name, mesh, rules, models, prompt_len=prompt_len)
    s = c.stages[name]
    return _measure(name, "update", update_rows(s), prompt_len + int(s.max_new_tokens), update, args, mesh, rules)


def stage_programs(c, name: str, mesh, rules, models: dict, *, prompt_len: int) -> list[ProgramMemory]:
    """Every jitted program a trained stage runs, compiled against abstract shapes."""
    s = c.stages[name]
    out = [update_program(c, name, mesh, rules, models, prompt_len=prompt_len)]
    if s.kind in ("rl", "opd") or s.get("source") == "teacher":
        out += sampler_programs(c, name, mesh, rules, models, prompt_len=prompt_len)
    if s.kind in ("rl", "opd"):
        scored = [s.model] + ([s.teacher, *s.extra_teachers] if s.kind == "opd" else [])
        out += [scoring_program(c, name, mesh, rules, models, prompt_len=prompt_len, slot=slot) for slot in scored]
    return out


def abstract_models(c, **override) -> dict:
    return {slot: abstract_model(c, slot, **override) for slot in c.models}
