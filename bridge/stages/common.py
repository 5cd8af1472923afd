"""Pieces every stage uses: the update step built from a stage's declaration (for the run and
for the ahead-of-time compile alike), rollouts with verifier rewards, the batch spec of a
rollout stage, and minibatching of a rollout batch for several optimizer updates."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge import distributed, losses, offload, runtime, sampling, train_state
from bridge.stages import Sampling


@dataclasses.dataclass
class Trainer:
    """The trained model's graphdef, its initial TrainState and the compiled update step."""

    graphdef: object  # of the trained module (`StageKind.trained`)
    state: train_state.TrainState
    update: Callable  # (state, batch, frozen) -> (state, metrics)
    policy_of: Callable = lambda module: module  # trained module -> its policy (`StageKind.policy_of`)


def make_update(kind, scfg, graphdef, frozen_graphdefs, tx, state_sharding=None) -> Callable:
    """The stage's jitted update step, from its declaration: loss, micro-batches and their
    weight. The real run (`make_trainer`) and `bridge.abstract` both build it here."""
    return train_state.make_update_step(graphdef, kind.make_loss(scfg, tuple(frozen_graphdefs)), tx,
                                        state_sharding=state_sharding, microbatches=int(scfg.microbatches),
                                        microbatch_weight=kind.microbatch_weight(scfg))


def optimizer(scfg, total_updates: int):
    opt_cfg = dict(scfg.optimizer.to_dict() if hasattr(scfg.optimizer, "to_dict") else scfg.optimizer)
    opt_cfg.setdefault("total_steps", total_updates)
    return train_state.make_optimizer(_Cfg(opt_cfg))


def make_trainer(ctx: runtime.Context, kind, scfg, model, frozen_graphdefs, total_updates: int,
                 wrap_optimizer: Callable = lambda tx: tx) -> Trainer:
    """The stage's state on the mesh and its jitted update step (see `train_state`); the state
    holds `kind.trained(scfg, model, ctx.model)` (the policy, or the policy with a critic) and
    the optimizer `wrap_optimizer(optimizer(scfg, total_updates))` (e.g. carrying an EMA)."""
    graphdef, params = nnx.split(kind.trained(scfg, model, ctx.model))
    params = jax.tree.map(jnp.copy, offload.fetch(params))  # the stage owns (and donates) its own buffers
    tx = wrap_optimizer(optimizer(scfg, total_updates))
    state = train_state.init_state(params, tx)
    shardings = train_state.state_shardings(state, ctx.mesh, ctx.rules)
    state = jax.device_put(state, shardings)
    return Trainer(graphdef, state, make_update(kind, scfg, graphdef, frozen_graphdefs, tx, shardings), kind.policy_of)


class _Cfg(dict):
    """dict with attribute access, for `make_optimizer`."""

    __getattr__ = dict.__getitem__


def token_count(weight_key: str | None = None) -> Callable:
    """Micro-batch weight of a token-mean loss: sum of the loss mask (times batch[weight_key],
    per row when 1-D, per token when 2-D)."""
    def count(batch):
        mask = batch["mask"].astype(jnp.float32)
        if weight_key is not None:
            w = batch[weight_key]
            mask = mask * (w[:, None] if w.ndim == 1 else w)
        return jnp.sum(mask)
    return count


def row_count(weight_key: str) -> Callable:
    """Micro-batch weight of a sequence-mean loss: the rows that count (a nonzero entry of
    mask * batch[weight_key]), as `losses.aggregate` counts them."""
    def count(batch):
        return losses.counted_rows(batch["mask"] * batch[weight_key][:, None])
    return count


def tis_weight(old_logp, sample_logp, cap: float):
    """Truncated importance weight min(pi_old / pi_sample, cap) per token [B, T] (Yao et al.
    2025, "Your efficient RL framework secretly brings you off-policy RL training"); both
    logprobs of the same untruncated, temperature-scaled distribution. cap <= 0: all ones."""
    if cap <= 0:
        return jnp.ones_like(old_logp)
    return jnp.minimum(jnp.exp(old_logp - sample_logp), cap)


def mismatch_metrics(old_logp, sample_logp, tis, mask) -> dict:
    """Sampler/trainer mismatch on the rollout: mean |log pi_old - log pi_sample| per token and
    the mean truncated importance weight."""
    return {"sampler_trainer_logp_gap": float(losses.masked_mean(jnp.abs(old_logp - sample_logp), mask)),
            "tis_weight_mean": float(losses.masked_mean(tis, mask))}


def scoring_slices(scfg) -> int:
    """Slices a rollout batch is scored in: each as many rows as an update's micro-batch, so
    scoring needs no more activation memory than training."""
    return int(scfg.minibatches * scfg.microbatches)


def check_vocab(teacher, student, stage: str) -> None:
    """Token-level distillation needs one vocabulary; stop at startup if the two differ."""
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise ValueError(f"Stage {stage!r}: the teacher's vocabulary ({vt} tokens) differs from the "
                         f"student's ({vs}); token-level distillation needs one shared tokenizer.")


def current_model(trainer: Trainer, state: train_state.TrainState):
    """The policy the trainer's state holds now."""
    return trainer.policy_of(nnx.merge(trainer.graphdef, state.params))


def rollout_update_rows(scfg) -> int:
    """Rows in one optimizer update of a stage that trains on its own rollouts."""
    return int(scfg.prompts_per_step * scfg.sampling.n // scfg.minibatches)


def rollout_sampling(scfg):
    """A rollout stage samples with its policy, `sample_batch_size` prompts a call (0: all)."""
    return Sampling("policy", int(scfg.get("sample_batch_size", 0) or scfg.prompts_per_step),
                    int(scfg.sampling.n), scfg.sampling)


def rollout_batch_spec(rows: int, prompt_len: int, completion: int, **extra) -> dict:
    """name -> (shape, dtype): the token arrays of a rollout batch, plus `extra` entries given
    as "row" (float32[rows]) or "token" (float32[rows, completion])."""
    tokens = (rows, completion)
    spec = {"prompt_tokens": ((rows, prompt_len), jnp.int32), "prompt_mask": ((rows, prompt_len), bool),
            "tokens": (tokens, jnp.int32), "mask": (tokens, bool)}
    for key, per in extra.items():
        spec[key] = ((rows,) if per == "row" else tokens, jnp.float32)
    return spec


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Completions of a batch of prompts with their verifier scores, from the sampler through
    scoring to the update; host (NumPy) arrays, R rows prompt-major (row b * n + j is sample j
    of prompt b), P prompt and N completion slots."""

    prompt_tokens: np.ndarray  # int32[R, P], left-padded
    prompt_mask: np.ndarray  # bool[R, P]
    tokens: np.ndarray  # int32[R, N], pad after the first eos
    mask: np.ndarray  # bool[R, N], up to and including the first eos
    sample_logp: np.ndarray  # float32[R, N]: the sampler's log-prob before truncation
    lengths: np.ndarray  # int32[R]
    truncated: np.ndarray  # bool[R]: cut at max_new_tokens
    rewards: np.ndarray  # float32[R]: the verifier's score in [0, 1]
    format_ok: np.ndarray  # float32[R]
    texts: tuple = ()
    examples: tuple = ()
    sample_tokens_per_s: float = 0.0

    TOKEN_KEYS = ("prompt_tokens", "prompt_mask", "tokens", "mask")

    @property
    def correct(self) -> np.ndarray:
        """bool[R]: the verifier scored the completion correct (score 1)."""
        return self.rewards >= 1.0

    def token_arrays(self) -> dict:
        """The arrays a teacher-forced pass reads: prompt_tokens, prompt_mask, tokens, mask."""
        return {k: getattr(self, k) for k in self.TOKEN_KEYS}

    def rows(self, index) -> "Rollout":
        """The rollout of the rows `index` (a slice or an index array), in that order."""
        picked = np.arange(len(self.tokens))[index]
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[picked] for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), np.ndarray)},
            texts=tuple(self.texts[i] for i in picked) if self.texts else (),
            examples=tuple(self.examples[i] for i in picked) if self.examples else ())

    @staticmethod
    def concat(parts: Sequence["Rollout"]) -> "Rollout":
        """Joins rollouts, padding prompts on the left and completions on the right to the widest."""
        if len(parts) == 1:
            return parts[0]
        p = max(x.prompt_tokens.shape[1] for x in parts)
        n = max(x.tokens.shape[1] for x in parts)
        fields = {}
        for f in dataclasses.fields(Rollout):
            values = [getattr(x, f.name) for x in parts]
            if f.name in ("prompt_tokens", "prompt_mask"):
                values = [np.pad(v, ((0, 0), (p - v.shape[1], 0))) for v in values]
            elif isinstance(values[0], np.ndarray) and values[0].ndim == 2:
                values = [np.pad(v, ((0, 0), (0, n - v.shape[1]))) for v in values]
            fields[f.name] = (np.concatenate(values) if isinstance(values[0], np.ndarray) else
                              sum(values, ()) if isinstance(values[0], tuple) else float(np.mean(values)))
        return Rollout(**fields)


def sample_rollout(ctx: runtime.Context, model, examples: Sequence, sampling_cfg, *, seed: int,
                   chunk_prompts: int = 0, prefixes: Sequence[str] | None = None) -> Rollout:
    """Samples `sampling_cfg.n` completions per prompt and scores them with the task's verifier.

    With chunk_prompts > 0 the prompts are sampled that many at a time (the KV cache of one
    chunk is alive at once), chunk j from seed + j. `prefixes` (one string per example, GHPO's
    guidance): each prompt is followed by its prefix, which the policy continues; the rollout's
    prompt tokens hold prompt + prefix, its texts the continuation alone, and the verifier
    scores prefix + continuation (`guided_prompt_ids`). `sampling_cfg.proxy` with an expert
    and an anti-expert reference decodes proxy-tuned (`proxy_models`).
    """
    # sampling.refill > 0: slot refill over every prompt in one call (its slots bound the cache)
    chunk = len(examples) if int(sampling_cfg.get("refill", 0)) else int(chunk_prompts) or len(examples)
    prefixes = list(prefixes) if prefixes is not None else [""] * len(examples)
    if len(prefixes) != len(examples):
        raise ValueError(f"sample_rollout: {len(prefixes)} prefixes for {len(examples)} examples.")
    t0 = time.perf_counter()
    parts = [_sample_chunk(ctx, model, examples[j:j + chunk], sampling_cfg, seed=seed + j,
                           prefixes=prefixes[j:j + chunk])
             for j in range(0, len(examples), chunk)]
    out = Rollout.concat(parts)
    return dataclasses.replace(out, sample_tokens_per_s=float(out.lengths.sum()) / max(time.perf_counter() - t0, 1e-9))


def guided_prompt_ids(task, example, prefix: str, tokenizer) -> list[int]:
    """The prompt of `example` followed by `prefix`, the start of the response: raw-text tasks
    tokenize prompt + prefix as one text, chat tasks append the prefix's tokens after the
    generation prompt (the assistant turn begins with it). No prefix: `task.prompt_ids`."""
    if not prefix:
        return task.prompt_ids(example, tokenizer)
    encode = lambda text: [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]  # noqa: E731
    if not task.chat:
        return encode(task.prompt_text(example) + prefix)
    return task.prompt_ids(example, tokenizer) + encode(prefix)


def proxy_models(ctx: runtime.Context, sc, model):
    """(expert, antiexpert, alpha) for `sampling.generate(proxy=...)` from the sampling
    sub-config's `proxy` (model references, `ctx.model`), or None when it names no expert.
    Proxy-tuning (Liu et al. 2024): the sampled model's logits plus alpha * (expert -
    antiexpert) at every step. References other than slots are loaded once per context (a
    slot is read each call: its model as of the last finished stage); every vocabulary must
    equal the sampled model's."""
    proxy = sc.get("proxy")
    if proxy is None or not (proxy.get("expert") or proxy.get("antiexpert")):
        return None
    where = f"Stage {ctx.current.id!r}" if ctx.current is not None else "Sampling"
    if not (proxy.get("expert") and proxy.get("antiexpert")):
        raise ValueError(f"{where}: sampling.proxy needs both an expert and an anti-expert model reference "
                         f"(got expert={proxy.get('expert')!r}, antiexpert={proxy.get('antiexpert')!r}).")
    cache = ctx.__dict__.setdefault("_proxy_models", {})
    pair = []
    for role in ("expert", "antiexpert"):
        ref = ctx.resolve(proxy[role])
        if ref.startswith(("hf:", "stage:", "artifact:")):
            if ref not in cache:
                cache[ref] = ctx.model(ref)
            found = cache[ref]
        else:
            found = ctx.model(ref)
        offload.park(ctx, found)  # system.frozen_on_host: the sampler copies it to device memory per call
        if found.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"{where}: the proxy {role} {proxy[role]!r} has {found.config.vocab_size} tokens, the "
                             f"sampled model {model.config.vocab_size}; proxy-tuning needs one shared vocabulary.")
        pair.append(found)
    return pair[0], pair[1], float(proxy.get("alpha", 1.0))


def _sample_chunk(ctx: runtime.Context, model, examples: Sequence, sc, *, seed: int, prefixes: Sequence[str] = ()) -> Rollout:
    n = int(sc.n)
    prefixes = list(prefixes) or [""] * len(examples)
    prompts = [guided_prompt_ids(ctx.task, e, p, ctx.tokenizer) for e, p in zip(examples, prefixes)]
    out = sampling.generate(model, prompts,
                            max_new_tokens=int(sc.max_new_tokens), temperature=float(sc.temperature),
                            top_p=float(sc.top_p), top_k=int(sc.top_k), min_p=float(sc.get("min_p", 0.0)),
                            eos_ids=tuple(ctx.eos_ids) + tuple(int(t) for t in sc.get("stop_ids", ())),
                            pad_id=ctx.pad_id, n=n, seed=seed, mesh=ctx.mesh, rules=ctx.rules,
                            proxy=proxy_models(ctx, sc, model), refill=int(sc.get("refill", 0)))
    # every process gets the whole batch (gathered from the hosts holding its rows) and scores it
    host = distributed.to_host({"prompt_tokens": out.prompt_tokens, "prompt_mask": out.prompt_mask,
                           "tokens": out.tokens, "mask": out.mask, "sample_logp": out.logprobs,
                           "finish_reason": out.finish_reason, "lengths": out.lengths})
    texts = runtime.decode_completions(ctx.tokenizer, host["tokens"], host["mask"], ctx.eos_ids)
    rows = [e for e in examples for _ in range(n)]
    heads = [p for p in prefixes for _ in range(n)]
    truncated = host.pop("finish_reason") == sampling.FINISH_LENGTH
    results = [ctx.task.reward(h + t, e, truncated=bool(c)) for h, t, e, c in zip(heads, texts, rows, truncated)]
    return Rollout(**host, truncated=truncated, rewards=np.array([r.score for r in results], np.float32),
                   format_ok=np.array([r.format_ok for r in results], np.float32), texts=tuple(texts),
                   examples=tuple(rows))


def place_rollout(ctx: runtime.Context, rollout: Rollout) -> tuple[dict, jax.Array]:
    """The rollout's token arrays as a batch on the mesh, and its sampler logprobs there."""
    placed = runtime.place_batch(ctx, {**rollout.token_arrays(), "sample_logp": rollout.sample_logp})
    return placed, placed.pop("sample_logp")


def pool_rows(ctx: runtime.Context, unit, step: int, rows: int, batch_size: int) -> np.ndarray:
    """Row indices of update `step` over a fixed pool of `rows`: consecutive slices of one
    seeded permutation per epoch (`ctx.np_rng`), so the batch at step i is a function of i."""
    epoch, pos = divmod(step * batch_size, rows)
    order = np.concatenate([ctx.np_rng(unit, epoch + e, "order").permutation(rows) for e in range(2)])
    return order[pos:pos + batch_size]


def minibatches(batch: dict, num: int, rng: np.random.Generator | None) -> list[dict]:
    """Splits the array entries of `batch` into `num` equal minibatches (shuffled when rng)."""
    rows = len(batch["tokens"])
    if rows % num:
        raise ValueError(f"{rows} rollout rows do not split into {num} minibatches.")
    order = rng.permutation(rows) if rng is not None else np.arange(rows)
    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) or isinstance(v, jax.Array)}
    return [{k: v[idx] for k, v in arrays.items()} for idx in np.split(order, num)]


def dispatch_updates(trainer: Trainer, state, batch: dict, frozen, *, epochs: int, num_minibatches: int,
                     rng: np.random.Generator, tokens: float):
    """`epochs` passes of `num_minibatches` updates over one rollout batch, shuffled by `rng`,
    dispatched to the devices without waiting. Returns (state, finish): finish() waits for the
    updates and returns the mean of their metrics plus train_tokens_per_s (from dispatch to the
    end of the wait, so work done meanwhile overlaps it)."""
    rng = rng if num_minibatches > 1 else None
    t0 = time.perf_counter()
    updates = []
    for _ in range(epochs):
        for mb in minibatches(batch, num_minibatches, rng):
            state, m = trainer.update(state, mb, frozen)
            updates.append(m)

    def finish() -> dict:
        metrics = mean_metrics(updates)  # waits for the updates, so the timing below is honest
        metrics["train_tokens_per_s"] = tokens * epochs / max(time.perf_counter() - t0, 1e-9)
        return metrics

    return state, finish


def run_updates(trainer: Trainer, state, batch: dict, frozen, **kw):
    """`dispatch_updates`, waited for: (state, metrics)."""
    state, finish = dispatch_updates(trainer, state, batch, frozen, **kw)
    return state, finish()


def response_metrics(rollout: Rollout) -> dict:
    """Reward, accuracy, response length and truncation rate of a rollout batch."""
    return {"reward": float(rollout.rewards.mean()), "accuracy": float(rollout.correct.mean()),
            "format_ok": float(rollout.format_ok.mean()), "response_length": float(rollout.lengths.mean()),
            "truncated_frac": float(rollout.truncated.mean()), "sample_tokens_per_s": rollout.sample_tokens_per_s}


def mean_metrics(items: Sequence[dict]) -> dict:
    """Mean of each metric over several update steps (device values fetched once)."""
    host = distributed.to_host(list(items))
    return {k: float(np.mean([np.asarray(m[k]) for m in host])) for k in host[0]}
