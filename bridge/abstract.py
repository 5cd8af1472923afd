"""A config's jitted programs compiled against abstract shapes: does it fit, before renting?

For every stage of the pipeline, everything read from its kind's declaration
(`bridge.stages.StageKind`): the update step (built by the same `stages.common.make_update`
as the real run: loss, optimizer, micro-batching and shardings), the rollout sampler's
prefill and decode for one sampling chunk, and the teacher-forced scoring pass of each model
the stage scores over a rollout batch. Each is lowered and
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
from bridge.stages import common


def abstract_model(c, slot: str, **override) -> Decoder:
    """The slot's model (config `arch` plus the run's dtypes, remat and scan), shapes only. An
    arch without `vocab_size` takes the run tokenizer's, as the run does."""
    arch = dict(c.models[slot].arch, **override)
    if "vocab_size" not in arch:
        from bridge import runtime

        arch["vocab_size"] = len(runtime.tokenizer_from_spec(runtime.tokenizer_spec(c)))
    cfg = ModelConfig(**arch, dtype=dtype_from_name(c.dtype), param_dtype=dtype_from_name(c.param_dtype),
                      remat=bool(c.get("remat", False)), scan_layers=bool(c.get("scan_layers", False)))
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def _spec_like(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def model_for(c, models: dict, ref: str):
    """The abstract model a reference names: a slot; "stage:X" / "artifact:X/..." (the slot
    stage X trains, "@k" ignored); "hf:<path>" (its config.json)."""
    if ref.startswith("hf:"):
        from bridge.models import read_config

        cfg = dataclasses.replace(read_config(ref[3:]), dtype=dtype_from_name(c.dtype),
                                  param_dtype=dtype_from_name(c.param_dtype), remat=bool(c.get("remat", False)),
                                  scan_layers=bool(c.get("scan_layers", False)))
        return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    for prefix in ("stage:", "artifact:"):
        if ref.startswith(prefix):
            stage = ref[len(prefix):].split("/")[0].split("@")[0]
            return models[c.stages[stage].model]
    return models[ref]


def _stage(c, name: str):
    from bridge import stages

    s = c.stages[name]
    return s, stages.kind(s.kind)


def stage_update(c, name: str, mesh, rules, models: dict, *, prompt_len: int):
    """(jitted update, abstract (state, batch, frozen)) of stage `name` on `mesh`."""
    s, kind = _stage(c, name)
    refs = kind.models(s)
    load = lambda ref: model_for(c, models, ref)  # noqa: E731
    graphdef, params = nnx.split(kind.trained(s, load(refs["policy"]), load))
    tx = common.optimizer(s, 1)
    state = jax.eval_shape(lambda p: train_state.init_state(p, tx), params)
    state_sharding = train_state.state_shardings(state, mesh, rules)
    split = [nnx.split(model_for(c, models, refs[role])) for role in kind.frozen_roles(s)]
    frozen = [st for _, st in split] or None
    if frozen is not None:
        frozen = _spec_like(frozen, sharding.state_shardings(frozen, mesh, rules))
    update = common.make_update(kind, s, graphdef, [g for g, _ in split], tx, state_sharding)
    rows = kind.update_rows(s)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))
             for k, (shape, dtype) in kind.batch_spec(s, rows, prompt_len, int(s.sampling.max_new_tokens)).items()}
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


def sampler_programs(c, name: str, mesh, rules, models: dict, *, prompt_len: int) -> list[ProgramMemory]:
    """The rollout sampler of stage `name` (prefill, then the decode loop) for one chunk."""
    s, kind = _stage(c, name)
    plan = kind.sampling(s)
    sc = plan.config
    config = sampling.SamplingConfig(max_new_tokens=int(sc.max_new_tokens), temperature=float(sc.temperature),
                                     top_p=float(sc.top_p), top_k=int(sc.top_k), n=plan.n)
    graphdef, state = nnx.split(model_for(c, models, kind.models(s)[plan.role]))
    states = (_spec_like(state, sharding.state_shardings(state, mesh, rules)),)
    rows_spec = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))
    prompts = plan.prompts
    tokens, mask = rows_spec((prompts, prompt_len), jnp.int32), rows_spec((prompts, prompt_len), bool)
    prefill = jax.jit(functools.partial(sampling.prefill, (graphdef,), config=config, mesh=mesh, rules=rules))
    with sharding.use_mesh(mesh, rules):
        caches, logits = jax.eval_shape(prefill, states, tokens, mask)
    r = prompts * plan.n
    decode = jax.jit(lambda st, caches, logits, prompt_mask, live, rng: sampling.decode(
        (graphdef,), st, caches, logits, prompt_mask, rng, config, live=live, mesh=mesh, rules=rules)[0],
        donate_argnums=(1,))
    decode_args = (states, caches, logits, rows_spec((r, prompt_len), bool), rows_spec((r,), bool),
                   jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    total = prompt_len + int(sc.max_new_tokens)
    return [_measure(name, "sample prefill", prompts, prompt_len, prefill, (states, tokens, mask), mesh, rules),
            _measure(name, "sample decode", r, total, decode, decode_args, mesh, rules)]


def scoring_program(c, name: str, mesh, rules, models: dict, *, prompt_len: int, role: str) -> ProgramMemory:
    """The teacher-forced scoring pass of the model in `role` over one rollout batch of a
    stage (old logprobs of the policy; a teacher's or reference's logprobs)."""
    s, kind = _stage(c, name)
    rows = int(s.prompts_per_step * s.sampling.n)
    graphdef, state = nnx.split(model_for(c, models, kind.models(s)[role]))
    fn = scoring.in_slices(lambda st, b: scoring.completion_logprobs(nnx.merge(graphdef, st), b, 1.0,
                                                                      return_entropy=True),
                           common.scoring_slices(s))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))
             for k, (shape, dtype) in common.rollout_batch_spec(rows, prompt_len, int(s.sampling.max_new_tokens)).items()}
    state = _spec_like(state, sharding.state_shardings(state, mesh, rules))
    program = "score" if role == "policy" else f"score {role}"
    return _measure(name, program, rows, prompt_len + int(s.sampling.max_new_tokens), jax.jit(fn), (state, batch),
                    mesh, rules)


def update_program(c, name: str, mesh, rules, models: dict, *, prompt_len: int) -> ProgramMemory:
    update, args = stage_update(c, name, mesh, rules, models, prompt_len=prompt_len)
    s, kind = _stage(c, name)
    return _measure(name, "update", kind.update_rows(s), prompt_len + int(s.sampling.max_new_tokens), update, args,
                    mesh, rules)


def stage_programs(c, name: str, mesh, rules, models: dict, *, prompt_len: int) -> list[ProgramMemory]:
    """Every jitted program a stage runs, compiled against abstract shapes."""
    s, kind = _stage(c, name)
    out = [update_program(c, name, mesh, rules, models, prompt_len=prompt_len)]
    if kind.sampling(s) is not None:
        out += sampler_programs(c, name, mesh, rules, models, prompt_len=prompt_len)
    out += [scoring_program(c, name, mesh, rules, models, prompt_len=prompt_len, role=role)
            for role in kind.scored_roles(s)]
    return out


def abstract_models(c, **override) -> dict:
    return {slot: abstract_model(c, slot, **override) for slot in c.models}
