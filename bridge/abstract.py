"""A config's jitted programs compiled against abstract shapes: does it fit, before renting?

For every stage of the pipeline, everything read from its kind's declaration
(`bridge.stages.StageKind`): the update step (built by the same `stages.common.make_update`
as the real run: loss, optimizer, micro-batching and shardings), the rollout sampler's
prefill and decode for one sampling chunk, and the teacher-forced scoring pass of each model
the stage scores over a rollout batch; and the evaluation each exported stage runs
(`evaluation_programs`: the sampler at eval.batch_size * eval.n rows, the scoring passes),
from which `largest_batch` picks the batch size that fits a budget. Each is lowered and
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
import math
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


def _rows_spec(mesh, rules, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules, shape))


def _placed(state, mesh, rules):
    """A model state (abstract or loaded) as specs placed by its logical axes."""
    return _spec_like(state, sharding.state_shardings(state, mesh, rules))


def _sample_programs(stage: str, label: str, graphdefs: tuple, states: tuple, config, prompts: int, prompt_len: int,
                     mesh, rules) -> list[ProgramMemory]:
    """The sampler's prefill of `prompts` rows, then its decode loop over prompts * n rows with
    a cache of prompt_len + max_new_tokens slots, donated by prefill and returned by decode as
    `sampling.Sampler` does, so XLA updates it in place (a decode that dropped its caches would
    hold a second cache in its temporaries: 17.2 GiB instead of 2.3 for Qwen3-1.7B, 8 x 16 rows)."""
    prefill = jax.jit(functools.partial(sampling.prefill, graphdefs, config=config, mesh=mesh, rules=rules))
    tokens, mask = _rows_spec(mesh, rules, (prompts, prompt_len), jnp.int32), _rows_spec(
        mesh, rules, (prompts, prompt_len), bool)
    with sharding.use_mesh(mesh, rules):
        caches, logits = jax.eval_shape(prefill, states, tokens, mask)
    r = prompts * config.n
    decode = jax.jit(lambda st, caches, logits, prompt_mask, live, rng: sampling.decode(
        graphdefs, st, caches, logits, prompt_mask, rng, config, live=live, mesh=mesh,
        rules=rules), donate_argnums=(1,))
    decode_args = (states, caches, logits, _rows_spec(mesh, rules, (r, prompt_len), bool),
                   _rows_spec(mesh, rules, (r,), bool), jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    total = prompt_len + config.max_new_tokens
    return [_measure(stage, f"sample prefill{label}", prompts, prompt_len, prefill, (states, tokens, mask), mesh,
                     rules),
            _measure(stage, f"sample decode{label}", r, total, decode, decode_args, mesh, rules)]


def sampler_programs(c, name: str, mesh, rules, models: dict, *, prompt_len: int) -> list[ProgramMemory]:
    """The rollout sampler of stage `name` (prefill, then the decode loop) for one chunk."""
    s, kind = _stage(c, name)
    plan = kind.sampling(s)
    sc = plan.config
    config = sampling.SamplingConfig(max_new_tokens=int(sc.max_new_tokens), temperature=float(sc.temperature),
                                     top_p=float(sc.top_p), top_k=int(sc.top_k), n=plan.n)
    graphdef, state = nnx.split(model_for(c, models, kind.models(s)[plan.role]))
    return _sample_programs(name, "", (graphdef,), (_placed(state, mesh, rules),), config, plan.prompts, prompt_len,
                            mesh, rules)


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


# ---- evaluation --------------------------------------------------------------------------------


def generate_rows(prompts: int, n: int, mesh, rules) -> int:
    """The rows `sampling.generate` pads a call of `prompts` prompts to: `sampling.bucket`, then
    a multiple that spreads rows * n evenly over the mesh's batch shards."""
    from bridge.evaluation import runner

    shards = runner.batch_shards(mesh, rules)
    step = shards // math.gcd(n, shards)
    return -(-sampling.bucket(prompts) // step) * step


def eval_programs(models: tuple, config: sampling.SamplingConfig, mesh, rules, *, prompts: int, prompt_len: int,
                  reference=None, label: str = "") -> list[ProgramMemory]:
    """The programs one `bridge.evaluation.runner.evaluate` batch of `prompts` prompts runs: the
    sampler's prefill and decode (models = (policy,) or (policy, expert, antiexpert) for
    proxy-tuning; rows padded as `sampling.generate` pads them, the prompt width bucketed as
    it does), the policy's entropy scoring pass over the prompts * n completions
    (`runner.scoring_batch`: rows padded to the batch shards) and, with a `reference` model, the
    KL pass. Models may be abstract or loaded; nothing is allocated."""
    from bridge.evaluation import runner

    split = [nnx.split(m) for m in models]
    graphdefs = tuple(g for g, _ in split)
    states = tuple(_placed(s, mesh, rules) for _, s in split)
    prompt_len = sampling.bucket(prompt_len, sampling.sampler.PROMPT_BUCKET_MIN)
    out = _sample_programs("eval", label, graphdefs, states, config, generate_rows(prompts, config.n, mesh, rules),
                           prompt_len, mesh, rules)
    rows, new = runner.scoring_rows(prompts * config.n, mesh, rules), config.max_new_tokens
    batch = (_rows_spec(mesh, rules, (rows, prompt_len), jnp.int32), _rows_spec(mesh, rules, (rows, prompt_len), bool),
             _rows_spec(mesh, rules, (rows, new), jnp.int32), _rows_spec(mesh, rules, (rows, new), bool))
    out.append(_measure("eval", f"score{label}", rows, prompt_len + new, runner.entropy_scorer(graphdefs[0]),
                        (states[0], *batch), mesh, rules))
    if reference is not None:
        ref_graphdef, ref_state = nnx.split(reference)
        kl = runner.kl_scorer(graphdefs[0], ref_graphdef, sampling.processors.scoring_temperature(config.temperature))
        out.append(_measure("eval", f"score kl{label}", rows, prompt_len + new, kl,
                            (states[0], _placed(ref_state, mesh, rules), *batch), mesh, rules))
    return out


def evaluated_models(c) -> list[tuple[str, str]]:
    """(model slot, KL reference or "") of every distinct evaluation a pipeline run makes: each
    exported unit evaluates its stage's model (`runtime.evaluate_slot`), with the KL to its
    stage's `eval_kl_reference` or `eval.kl_reference` when that names a model of the config."""
    from bridge import runtime

    if not int(c.eval.num_prompts):
        return []
    out = []
    for _, scfg, export in runtime.pipeline_units(c):
        ref = str(scfg.get("eval_kl_reference") or c.eval.get("kl_reference") or "")
        stage = ref.split(":", 1)[1].split("/")[0].split("@")[0] if ref.startswith(("stage:", "artifact:")) else ""
        if stage and stage not in c.stages:  # a stage outside this config: the run reports no KL
            ref = ""
        if export and (scfg.model, ref) not in out:
            out.append((scfg.model, ref))
    return out


def _reference_model(c, models: dict, ref: str):
    """`model_for`, except that "hf:<folder>" naming a slot's `hf_dir` is that slot's model
    (its config arch: the folder need not be on this machine)."""
    slot = next((k for k, m in c.models.items() if ref.startswith("hf:") and m.get("hf_dir") == ref[3:]), None)
    return models[slot] if slot else model_for(c, models, ref)


def evaluation_programs(c, mesh, rules, models: dict, *, prompt_len: int, batch_size: int = 0) -> list[ProgramMemory]:
    """`eval_programs` of every distinct evaluation of the pipeline (`evaluated_models`) at the
    config's eval settings: n, temperature / top-p / top-k, max_new_tokens and min(batch_size,
    num_prompts) prompts per batch (`batch_size` > 0 overrides eval.batch_size). Programs are
    labelled by the slots evaluated with them, e.g. "sample decode (teacher)", "score kl (student;
    kl to student_sft)" (slots of one architecture share their rows).
    The held-out curve (`eval.every`) decodes greedily with n = 1 at the same batch size,
    within these."""
    e = c.eval
    config = sampling.SamplingConfig(max_new_tokens=int(e.max_new_tokens), temperature=float(e.get("temperature", 0.0)),
                                     top_p=float(e.get("top_p", 1.0)), top_k=int(e.get("top_k", 0)),
                                     n=int(e.get("n", 1)))
    prompts = min(int(batch_size or e.batch_size), int(e.num_prompts))
    same = {}  # (model config, reference config) -> the slots and reference that evaluate so
    for slot, ref in evaluated_models(c):
        model, reference = model_for(c, models, slot), _reference_model(c, models, ref) if ref else None
        key = (model.config, None if reference is None else reference.config)
        same.setdefault(key, ([], ref, model, reference))[0].append(slot)
    out = []
    for slots, ref, model, reference in same.values():  # one architecture's programs once
        label = f" ({', '.join(slots)}" + (f"; kl to {ref.split(':', 1)[-1]})" if ref else ")")
        out += eval_programs((model,), config, mesh, rules, prompts=prompts, prompt_len=prompt_len,
                             reference=reference, label=label)
    return out


def largest_batch(programs_at, upper: int, budget_gib: float) -> int:
    """The largest b in [1, upper] whose programs, `programs_at(b)` (a list of ProgramMemory),
    each fit `budget_gib` per device (arguments + temporaries), by bisection (memory grows with
    b); 0 when even b = 1 does not fit."""
    fits = lambda b: all(m.total_gib <= budget_gib for m in programs_at(b))  # noqa: E731
    lo, hi = 0, int(upper)  # lo fits (or is 0), everything above hi is known not to
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
