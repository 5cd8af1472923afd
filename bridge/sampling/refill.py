"""Slot refill (continuous batching): a fixed number of decode slots; when a row stops (eos,
stop id or max_new_tokens) its slot takes the next waiting row.

Rollout lengths are heavy-tailed; in a static batch every row pays for the longest one. Here
B slots decode together and each finished slot is refilled with the next queued row (rows
prompt-major, r = prompt * n + sample), so the work is about the sum of the lengths rather
than rows x longest:

    host loop:
        refill: the finished slots take the next rows; one compiled prefill of those rows
                (count bucketed to a power of two), written into the slots' cache rows;
                their first token is picked from the prefill's logits
        decode: one compiled `lax.while_loop` of at most `chunk` steps over all slots; it
                returns early once `min_refill` slots (or every waiting row's worth) finished
    until the queue is empty and every slot has finished.

The cache (KVCache, every model's: policy and proxy pair) has one shared write slot g for all
rows, as in the static sampler. A row refilled at g has its left-padded prompt written at
slots [g - P, g) (the rest of its cache row invalid) and its new tokens at g, g + 1, ...; with
RoPE positions per row and attention masked by slot validity, that is the static layout moved
by g - P. The cache holds P + N - 1 + chunk slots; before a decode round that could run past
the end, every cache is shifted left by the oldest live row's start (one copy).

Outputs are identical to the static sampler's (`sampler.generate`) on the same prompts and
seed: every row draws with its own key fold_in(fold_in(rng, row), token index)
(`sampler.row_keys`), so greedy and seeded sampling give the same tokens, masks, lengths and
finish reasons; logprobs agree to float rounding (batch shapes differ). Each row keeps its
own prompt prefill (n rows of a prompt are prefilled separately when they enter).

Compiled programs: one decode round per (models, config, slots, shapes) and one refill per
refill-count bucket (log2(slots) + 1 at most); repeated calls with the same bucketed shapes
reuse them.
"""

from __future__ import annotations

import contextlib
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge import sharding as shd
from bridge.models.decoder import KVCache
from bridge.sampling import processors
from bridge.sampling import sampler as static


@flax.struct.dataclass
class SlotState:
    """Decode state of B slots. R = output rows (padded), N = max_new_tokens, S = cache slots."""

    caches: tuple  # KVCache per model, B rows, S slots; index = g, the next write slot (shared)
    token: jax.Array  # int32[B]; the last picked token of each slot (fed at the next step)
    step: jax.Array  # int32[B]; index of the next token to pick (N when the slot is empty)
    start: jax.Array  # int32[B]; real prompt length = RoPE position of the row's first new token
    row: jax.Array  # int32[B]; global row id (R = none: writes to it are dropped)
    done: jax.Array  # bool[B]; the row picked a stop/eos token
    stops: jax.Array  # int32[B, K]; the row's own stop ids (-1 padded)
    tokens: jax.Array  # int32[R, N]; outputs by global row
    logprobs: jax.Array  # float32[R, N]
    mask: jax.Array  # bool[R, N]

    def finished(self, n_new: int) -> jax.Array:
        return self.done | (self.step >= n_new)


def _rows_axis(x):
    return x.ndim - 4  # caches: [..., B, H_kv, S, Dh]


def _pick(logits, rng, rows, steps, stops, config):
    """Token, logprob and stop flag for fresh rows (prefill logits) or running slots."""
    token, logprob = static._select(logits, rng, rows, steps, config)
    stop = processors.is_stop(token, config.eos_ids) | processors.is_row_stop(token, stops)
    return token, logprob, stop


def _write(state: SlotState, rows, steps, token, logprob, on):
    """Scatters each slot's token into the output rows (dropped where `on` is false)."""
    r = state.tokens.shape[0]
    rows = jnp.where(on, rows, r)
    kw = dict(mode="drop")
    return state.replace(tokens=state.tokens.at[rows, steps].set(token, **kw),
                         logprobs=state.logprobs.at[rows, steps].set(logprob, **kw),
                         mask=state.mask.at[rows, steps].set(True, **kw))


def init_state(model_configs, slots: int, rows: int, prompt_len: int, stop_width: int, config, chunk: int,
               mesh=None, rules=None) -> SlotState:
    """Empty slots (every one finished), caches of P + N - 1 + chunk slots with g = P."""
    n_new = config.max_new_tokens
    length = prompt_len + n_new - 1 + chunk
    caches = []
    for cfg in model_configs:
        cache = KVCache.init(cfg, slots, length)
        caches.append(static._constrain_cache(cache.replace(index=jnp.asarray(prompt_len, jnp.int32)), mesh, rules))
    return SlotState(caches=tuple(caches), token=jnp.full((slots,), config.pad_id, jnp.int32),
                     step=jnp.full((slots,), n_new, jnp.int32), start=jnp.zeros((slots,), jnp.int32),
                     row=jnp.full((slots,), rows, jnp.int32), done=jnp.ones((slots,), bool),
                     stops=jnp.full((slots, stop_width), -1, jnp.int32),
                     tokens=jnp.full((rows, n_new), config.pad_id, jnp.int32),
                     logprobs=jnp.zeros((rows, n_new), jnp.float32), mask=jnp.zeros((rows, n_new), bool))


def refill(graphdefs, states, state: SlotState, slots, rows, prompt_tokens, prompt_mask, stops, rng, config):
    """Prefills `rows` (global ids; prompt_tokens/mask [m, P] left-padded, stops [m, K]) into
    cache rows `slots` (int32[m]; an index >= B marks a padding entry) at slots [g - P, g),
    picks their first token and writes it to the outputs."""
    m, p = prompt_tokens.shape
    b = state.token.shape[0]
    g = state.caches[0].index
    new_caches, logits = [], []
    for graphdef, st, cache in zip(graphdefs, states, state.caches):
        model = nnx.merge(graphdef, st)
        small = KVCache.init(model.config, m, p)
        hidden, small = model.hidden_states(prompt_tokens, attention_mask=prompt_mask, cache=small)
        logits.append(jnp.dot(hidden[:, -1], model.head(), preferred_element_type=jnp.float32))
        s = cache.length

        def put(full, new):  # whole cache rows: the prompt at [g - P, g), zeros elsewhere
            ax = _rows_axis(full)
            shape = list(new.shape)
            shape[ax + 2] = s
            row = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(shape, full.dtype), new.astype(full.dtype), g - p,
                                                      axis=ax + 2)
            index = (slice(None),) * ax + (slots,)
            return full.at[index].set(row, mode="drop")

        k, v = jax.tree.map(put, (cache.k, cache.v), (small.k, small.v))
        valid_rows = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((m, s), bool), prompt_mask, g - p, axis=1)
        new_caches.append(KVCache(k=k, v=v, valid=cache.valid.at[slots].set(valid_rows, mode="drop"), index=g))
    zero = jnp.zeros((m,), jnp.int32)
    token, logprob, stop = _pick(static._combine(logits, config.proxy_alpha), rng, rows, zero, stops, config)
    real = slots < b
    state = _write(state.replace(caches=tuple(new_caches)), rows, zero, token, logprob, real)
    at = lambda x, v: x.at[slots].set(v, mode="drop")  # noqa: E731
    return state.replace(token=at(state.token, token), step=at(state.step, jnp.ones((m,), jnp.int32)),
                         start=at(state.start, jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)),
                         row=at(state.row, rows), done=at(state.done, stop), stops=at(state.stops, stops))


def shift(state: SlotState, delta) -> SlotState:
    """Moves every cache left by `delta` slots (g -= delta); slots from the new g on are invalid."""
    caches = []
    for cache in state.caches:
        k, v = jax.tree.map(lambda x: jnp.roll(x, -delta, axis=x.ndim - 2), (cache.k, cache.v))
        g = cache.index - delta
        valid = jnp.roll(cache.valid, -delta, axis=1) & (jnp.arange(cache.length) < g)[None]
        caches.append(KVCache(k=k, v=v, valid=valid, index=g))
    return state.replace(caches=tuple(caches))


def decode_round(graphdefs, states, state: SlotState, need, rng, config, chunk: int, mesh=None, rules=None):
    """At most `chunk` decode steps of every slot; stops early when every slot has finished or
    `need` slots have. Returns (state, steps run)."""
    n_new = config.max_new_tokens
    b = state.token.shape[0]
    models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]

    def cond(carry):
        t, st = carry
        fin = st.finished(n_new)
        return (t < chunk) & ~jnp.all(fin) & (jnp.sum(fin) < need)

    def body(carry):
        t, st = carry
        running = ~st.finished(n_new)
        positions = (st.start + jnp.maximum(st.step, 1) - 1)[:, None]
        caches, step_logits = [], []
        for model, cache in zip(models, st.caches):
            out, cache = model(st.token[:, None], positions=positions, attention_mask=jnp.ones((b, 1), bool),
                               cache=cache)
            caches.append(static._constrain_cache(cache, mesh, rules))
            step_logits.append(out[:, 0])
        steps = jnp.minimum(st.step, n_new - 1)
        token, logprob, stop = _pick(static._combine(step_logits, config.proxy_alpha), rng, st.row, steps,
                                     st.stops, config)
        token = jnp.where(running, token, config.pad_id)
        st = _write(st.replace(caches=tuple(caches)), st.row, steps, token, logprob, running)
        st = st.replace(token=token, step=st.step + running, done=st.done | (running & stop))
        return t + 1, st

    t, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
    return state, t, state.finished(n_new)


class RefillSampler:
    """Compiled refill, shift and decode rounds for one model structure, config, slot count,
    chunk and mesh; `__call__` runs the host loop."""

    def __init__(self, graphdefs, model_configs, config, *, slots: int, chunk: int = 32, min_refill: int = 0, mesh=None,
                 rules=None):
        self.graphdefs, self.config = tuple(graphdefs), config
        self.slots, self.chunk = int(slots), int(chunk)
        self.min_refill = int(min_refill) or max(1, self.slots // 8)
        self.mesh, self.rules = mesh, rules
        gd, cfg = self.graphdefs, config
        mc = tuple(model_configs)
        self._init = jax.jit(lambda rows, p, k: init_state(mc, self.slots, rows, p, k, cfg, self.chunk, mesh, rules),
                             static_argnums=(0, 1, 2))
        self._refill = jax.jit(lambda states, st, *a: refill(gd, states, st, *a, config=cfg), donate_argnums=(1,))
        self._shift = jax.jit(shift, donate_argnums=(0,))
        self._decode = jax.jit(lambda states, st, need, rng: decode_round(gd, states, st, need, rng, cfg, self.chunk,
                                                                          mesh, rules), donate_argnums=(1,))
        self._finish = jax.jit(lambda st, pt, pm, stops: static._finish(st.tokens, st.logprobs, st.mask, pt, pm, cfg,
                                                                        jnp.repeat(stops, cfg.n, axis=0)))

    def __call__(self, states, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, rng, row_stops: np.ndarray,
                 num_rows: int) -> static.SampleOutput:
        """prompt_tokens/mask [Bp, P] left-padded (numpy), row_stops [Bp, K]; rows 0..num_rows-1
        (prompt-major, n per prompt) are sampled; the output has Bp * n rows."""
        n, n_new, b, chunk = self.config.n, self.config.max_new_tokens, self.slots, self.chunk
        bp, p = prompt_tokens.shape
        total = bp * n
        with contextlib.nullcontext() if self.mesh is None else shd.use_mesh(self.mesh, self.rules):
            state = self._init(total, p, row_stops.shape[1])
            g, length = p, p + n_new - 1 + chunk
            begin = np.zeros((b,), np.int64)  # cache slot of each slot's prompt start
            finished = np.ones((b,), bool)
            queue = 0
            stats = dict(rounds=0, steps=0, refills=0, shifts=0)
            while True:
                free = np.flatnonzero(finished)
                take = min(len(free), num_rows - queue)
                if take:
                    m = min(b, 1 << (take - 1).bit_length())
                    slots = np.full((m,), b, np.int32)
                    slots[:take] = free[:take]
                    rows = np.full((m,), total, np.int32)
                    rows[:take] = np.arange(queue, queue + take)
                    src = np.minimum(rows // n, bp - 1)
                    tokens, mask = prompt_tokens[src], prompt_mask[src].copy()
                    mask[take:, -1] = True  # padding entries: one real token, results dropped
                    state = self._refill(states, state, jnp.asarray(slots), jnp.asarray(rows), jnp.asarray(tokens),
                                         jnp.asarray(mask), jnp.asarray(row_stops[src]), rng)
                    begin[free[:take]] = g - p
                    finished[free[:take]] = False  # (a row may stop at its first token: the round sees it)
                    queue += take
                    stats["refills"] += 1
                if g + chunk > length:  # shift by the oldest running row's start (> 0 here)
                    low = int(begin[~finished].min())
                    state = self._shift(state, jnp.asarray(low, jnp.int32))
                    g -= low
                    stats["shifts"] += 1
                    begin -= low
                waiting = num_rows - queue
                need = min(self.min_refill, waiting) if waiting else b + 1
                state, steps, fin = self._decode(states, state, jnp.asarray(need, jnp.int32), rng)
                steps, fin = jax.device_get((steps, fin))
                finished = np.array(fin)
                g += int(steps)
                stats["rounds"] += 1
                stats["steps"] += int(steps)
                if queue == num_rows and finished.all():
                    break
            self.last_stats = stats  # host loop counts of the last call (benchmarks read them)
            return self._finish(state, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), jnp.asarray(row_stops))
