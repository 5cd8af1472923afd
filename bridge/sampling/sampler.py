"""Rollout sampler: jitted prefill, then a `lax.while_loop` decode over a preallocated KV cache.

    prompts (ragged) -> left-pad to [B, P] -> prefill (one pass, cache of length P, logits of
    the last slot only) -> pad the cache to P + N slots and repeat each row n times ->
    decode: for i < N while some row is running:
        token_i ~ softmax(process(logits)),  logprob_i = log_softmax(logits / T)[token_i]
        logits = model(token_i at position len(prompt) + i, cache slot P + i)

logprob_i is taken before top-k/top-p/min-p truncation: it is what the trainer recomputes
for the same token, so pi_trainer / pi_sampler measures sampler/trainer mismatch only.
Greedy (temperature 0) takes the argmax and reports log_softmax(raw logits)[argmax]. A row
stops after its first stop/eos token: later tokens are `pad_id`, logprob 0, mask false.
Rows of sample j of prompt b sit at b * n + j (prompt-major). Proxy-tuning adds
alpha * (expert - antiexpert) logits before processing; each model keeps its own cache.

Entry points, from most to least convenient:
- `generate(model, prompts, ...)`: Python lists in, `SampleOutput` out; pads batch and
  prompt length to buckets and caches one compiled `Sampler` per settings, so repeated
  calls in an RL loop compile once per bucket.
- `make_sampler(graphdef, config, ...)` -> `Sampler`: jitted `prefill` and `decode`
  (the cache is donated to decode), with mesh shardings; call it with (state, prompt_tokens,
  prompt_mask, rng).
- `sample(graphdef, state, prompt_tokens, prompt_mask, rng, config)`: the pure function,
  for use inside other jitted code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge import sharding as shd
from bridge.models.decoder import KVCache
from bridge.sampling import processors

FINISH_EOS = 0
FINISH_LENGTH = 1


@flax.struct.dataclass
class SampleOutput:
    """R = B * n rows, prompt-major. N = max_new_tokens, P = padded prompt length."""

    tokens: jax.Array  # int32[R, N]; pad_id after the first eos
    logprobs: jax.Array  # float32[R, N]; log_softmax(logits / T)[token] before truncation; 0 off the mask
    mask: jax.Array  # bool[R, N]; true up to and including the first eos
    lengths: jax.Array  # int32[R]; number of true mask entries
    finish_reason: jax.Array  # int32[R]; FINISH_EOS or FINISH_LENGTH
    prompt_tokens: jax.Array  # int32[R, P]; left-padded with pad_id
    prompt_mask: jax.Array  # bool[R, P]; false on the left padding


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable: one compilation per distinct config and shape)."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    n: int = 1
    proxy_alpha: float = 0.0  # used only when proxy models are given
    # Optional logits hook (logits float32[R, V], row int32[R], step int32[R]) -> logits, applied
    # to the combined logits before selection; row is the global row id (prompt * n + sample) and
    # step the index of the token being picked. Static (hashed): a module-level function.
    processor: Callable | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}.")
        if self.top_k < 0 or not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"need top_k >= 0 and 0 <= min_p < 1; got top_k={self.top_k}, min_p={self.min_p}.")
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1; got {self.n}.")


# ---- pure functions ----------------------------------------------------------------------------


def _constrain(x, logical_axes, mesh, rules):
    if mesh is None:
        return x
    spec = shd.logical_to_spec(logical_axes, rules or shd.DEFAULT_RULES, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _constrain_cache(cache: KVCache, mesh, rules) -> KVCache:
    if mesh is None:
        return cache
    kv_axes = lambda x: ("layers",) * (x.ndim - 4) + ("batch", "kv_heads", "length", "head_dim")  # noqa: E731
    k, v = jax.tree.map(lambda x: _constrain(x, kv_axes(x), mesh, rules), (cache.k, cache.v))
    return KVCache(k=k, v=v, valid=_constrain(cache.valid, ("batch", "length"), mesh, rules), index=cache.index)


def _combine(logits: Sequence[jax.Array], alpha: float) -> jax.Array:
    if len(logits) == 1:
        return logits[0]
    return processors.proxy_tune(logits[0], logits[1], logits[2], alpha)


def greedy(logits: jax.Array):
    """(argmax int32[R], log_softmax(logits)[argmax] float32[R]); the lowest index wins ties.

    The argmax is computed as max, then the smallest index attaining it (as a float max over
    -index, exact for V < 2^24): two vectorized reductions instead of XLA's (value, index) pair
    reduce, which is several times slower on CPU. log p(argmax) = -log(sum exp(logits - max)).
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.float32, logits.shape, logits.ndim - 1)
    token = -jnp.max(jnp.where(logits == top, -index, -jnp.inf), axis=-1)
    logprob = -jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    return token.astype(jnp.int32), logprob


def row_keys(rng: jax.Array, rows: jax.Array, steps: jax.Array) -> jax.Array:
    """One key per row: fold_in(fold_in(rng, row), step). A row's draws depend on its global
    row id and the token index only, not on its batch slot or the batch around it, so the
    static sampler and slot refill (`bridge.sampling.refill`) draw the same tokens."""
    return jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(rng, r), i))(rows, steps)


def _select(logits: jax.Array, rng: jax.Array, rows: jax.Array, steps: jax.Array, config: SamplingConfig):
    """(token int32[R], logprob float32[R]) from last-slot logits float32[R, V]; rows and
    steps int32[R] are each row's global id and token index (its random key, `row_keys`)."""
    if config.processor is not None:
        logits = config.processor(logits, rows, steps)
    if config.temperature == 0.0:
        return greedy(logits)
    scaled = processors.apply_temperature(logits.astype(jnp.float32), config.temperature)
    z = processors.truncate(scaled, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p)
    token = jax.vmap(jax.random.categorical)(row_keys(rng, rows, steps), z)
    picked = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
    logprob = picked - jax.nn.logsumexp(scaled, axis=-1)  # before truncation: what the trainer scores
    return token.astype(jnp.int32), logprob


def prefill(graphdefs, states, prompt_tokens, prompt_mask, config: SamplingConfig, *, mesh=None, rules=None):
    """One pass over the left-padded prompts of every model (policy, then proxy expert and
    antiexpert). Returns (caches with P + N slots and B * n rows, combined last-slot logits
    float32[B * n, V])."""
    b, p = prompt_tokens.shape
    prompt_tokens = _constrain(prompt_tokens, ("batch", None), mesh, rules)
    prompt_mask = _constrain(prompt_mask, ("batch", None), mesh, rules)
    caches, logits = [], []
    for graphdef, state in zip(graphdefs, states):
        model = nnx.merge(graphdef, state)
        cache = _constrain_cache(KVCache.init(model.config, b, p), mesh, rules)
        hidden, cache = model.hidden_states(prompt_tokens, attention_mask=prompt_mask, cache=cache)
        last = jnp.dot(hidden[:, -1], model.head(), preferred_element_type=jnp.float32)
        def grow(x, batch_axis, length_axis):  # room for the new tokens, then n rows per prompt
            pad = [(0, 0)] * x.ndim
            pad[length_axis] = (0, config.max_new_tokens)
            return jnp.repeat(jnp.pad(x, pad), config.n, axis=batch_axis)

        k, v = jax.tree.map(lambda x: grow(x, x.ndim - 4, x.ndim - 2), (cache.k, cache.v))
        cache = KVCache(k=k, v=v, valid=grow(cache.valid, 0, 1), index=cache.index)
        caches.append(_constrain_cache(cache, mesh, rules))
        logits.append(jnp.repeat(last, config.n, axis=0))
    return tuple(caches), _combine(logits, config.proxy_alpha)


def decode(graphdefs, states, caches, logits, prompt_mask, rng, config: SamplingConfig, *,
           live=None, row_stops=None, mesh=None, rules=None):
    """Decode loop from the prefill's caches and logits. prompt_mask bool[R, P] (rows already
    repeated n times); live bool[R] marks real rows (padding rows start finished); row_stops
    int32[R, K] (-1 padded) are stop ids of each row on top of config.eos_ids.

    Returns ((tokens, logprobs, mask) of shape [R, N], final caches). Returning the caches
    lets a jitted caller donate them: the loop then updates the prefill's buffers in place."""
    r = logits.shape[0]
    n_new = config.max_new_tokens
    models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
    start = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)  # position of the first new token
    live = jnp.ones((r,), bool) if live is None else live
    row_stops = jnp.zeros((r, 0), jnp.int32) if row_stops is None else row_stops

    rows = jnp.arange(r, dtype=jnp.int32)

    def pick(i, logits, done):
        token, logprob = _select(logits, rng, rows, jnp.full((r,), i, jnp.int32), config)
        token = jnp.where(done, config.pad_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        stop = processors.is_stop(token, config.eos_ids) | processors.is_row_stop(token, row_stops)
        return token, logprob, done | stop

    def write(buffers, i, token, logprob, running):
        tokens, logprobs, mask = buffers
        col = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, i))  # noqa: E731
        return col(tokens, token), col(logprobs, logprob), col(mask, running)

    token, logprob, done = pick(0, logits, ~live)
    buffers = (jnp.full((r, n_new), config.pad_id, jnp.int32), jnp.zeros((r, n_new), jnp.float32),
               jnp.zeros((r, n_new), bool))
    buffers = tuple(_constrain(x, ("batch", None), mesh, rules) for x in buffers)
    buffers = write(buffers, 0, token, logprob, live)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < n_new) & ~jnp.all(done)

    def body(carry):
        i, caches, token, done, buffers = carry
        positions = (start + i - 1)[:, None]
        new_caches, step_logits = [], []
        for model, cache in zip(models, caches):
            out, cache = model(token[:, None], positions=positions, attention_mask=jnp.ones((r, 1), bool),
                               cache=cache)
            new_caches.append(_constrain_cache(cache, mesh, rules))
            step_logits.append(out[:, 0])
        running = ~done
        token, logprob, done = pick(i, _combine(step_logits, config.proxy_alpha), done)
        return i + 1, tuple(new_caches), token, done, write(buffers, i, token, logprob, running)

    carry = (jnp.ones((), jnp.int32), tuple(caches), token, done, buffers)
    _, caches, _, _, buffers = jax.lax.while_loop(cond, body, carry)
    return buffers, caches


def _finish(tokens, logprobs, mask, prompt_tokens, prompt_mask, config: SamplingConfig,
            row_stops=None) -> SampleOutput:
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    stop = processors.is_stop(tokens, config.eos_ids)
    if row_stops is not None:
        stop = stop | processors.is_row_stop(tokens, row_stops)
    stopped = jnp.any(mask & stop, axis=1)
    return SampleOutput(tokens=tokens, logprobs=logprobs, mask=mask, lengths=lengths,
                        finish_reason=jnp.where(stopped, FINISH_EOS, FINISH_LENGTH).astype(jnp.int32),
                        prompt_tokens=jnp.repeat(prompt_tokens, config.n, axis=0),
                        prompt_mask=jnp.repeat(prompt_mask, config.n, axis=0))


def sample(graphdef, state, prompt_tokens, prompt_mask, rng, config: SamplingConfig, *,
           proxy_graphdefs=(), proxy_states=(), live=None, row_stops=None, mesh=None, rules=None) -> SampleOutput:
    """Pure sampler (jit-able, usable inside other jitted code).

    prompt_tokens int32[B, P] left-padded, prompt_mask bool[B, P] (every real row has at least
    one true entry), rng a PRNG key, live bool[B] (false for batch-padding rows), row_stops
    int32[B, K] extra stop ids per prompt (-1 padded). With
    proxy_graphdefs=(expert, antiexpert) and their states, decodes from
    logits + config.proxy_alpha * (expert - antiexpert).
    """
    graphdefs, states = (graphdef, *proxy_graphdefs), (state, *proxy_states)
    _check_proxy(graphdefs)
    caches, logits = prefill(graphdefs, states, prompt_tokens, prompt_mask, config, mesh=mesh, rules=rules)
    rows = lambda x: None if x is None else jnp.repeat(x, config.n, axis=0)  # noqa: E731
    (tokens, logprobs, mask), _ = decode(graphdefs, states, caches, logits, rows(prompt_mask), rng, config,
                                         live=rows(live), row_stops=rows(row_stops), mesh=mesh, rules=rules)
    return _finish(tokens, logprobs, mask, prompt_tokens, prompt_mask, config, rows(row_stops))


def _check_proxy(graphdefs):
    if len(graphdefs) not in (1, 3):
        raise ValueError(f"proxy needs exactly two models (expert, antiexpert); got {len(graphdefs) - 1}.")


# ---- compiled sampler --------------------------------------------------------------------------


class Sampler:
    """Jitted `prefill` and `decode` for one model structure, config and mesh.

    `sampler(state, prompt_tokens, prompt_mask, rng, proxy_states=(), live=None)` runs both;
    the KV caches made by prefill are donated to decode. jax.jit caches one executable per
    input shape, so callers should bucket shapes (as `generate` does). With a mesh, params
    are placed by their logical axes and the batch over ("data", "fsdp") (via `rules`).
    """

    def __init__(self, graphdef, config: SamplingConfig, *, proxy_graphdefs=(), mesh=None, rules=None):
        self.graphdefs = (graphdef, *proxy_graphdefs)
        _check_proxy(self.graphdefs)
        self.config, self.mesh, self.rules = config, mesh, rules
        kw = dict(config=config, mesh=mesh, rules=rules)

        def prefill_fn(states, prompt_tokens, prompt_mask):
            return prefill(self.graphdefs, states, prompt_tokens, prompt_mask, **kw)

        def decode_fn(states, caches, logits, prompt_tokens, prompt_mask, live, rng, row_stops):
            rows = lambda x: jnp.repeat(x, config.n, axis=0)  # noqa: E731
            (tokens, logprobs, mask), caches = decode(self.graphdefs, states, caches, logits, rows(prompt_mask),
                                                      rng, live=rows(live), row_stops=rows(row_stops), **kw)
            return _finish(tokens, logprobs, mask, prompt_tokens, prompt_mask, config, rows(row_stops)), caches

        self._prefill_fn, self._decode_fn = prefill_fn, decode_fn
        self._jitted = None

    def _compile(self, states):
        if self.mesh is None:
            self._jitted = (jax.jit(self._prefill_fn), jax.jit(self._decode_fn, donate_argnums=(1,)))
            return
        rules = self.rules or shd.DEFAULT_RULES
        state_sh = tuple(shd.state_shardings(s, self.mesh, rules) for s in states)
        self._state_shardings = state_sh
        # Batch inputs arrive placed by `__call__` (rows over the batch axes where they divide);
        # prefill's outputs keep whatever sharding XLA gave them, so decode takes them as they come.
        self._jitted = (
            jax.jit(self._prefill_fn, in_shardings=(state_sh, None, None)),
            jax.jit(self._decode_fn, donate_argnums=(1,), in_shardings=(state_sh,) + (None,) * 7),
        )

    def place(self, states):
        """Puts model states on the mesh by their logical axes (no-op without a mesh)."""
        if self.mesh is None:
            return tuple(states)
        if self._jitted is None:
            self._compile(states)
        return tuple(jax.device_put(s, sh) for s, sh in zip(states, self._state_shardings))

    def prefill(self, states, prompt_tokens, prompt_mask):
        if self._jitted is None:
            self._compile(states)
        return self._jitted[0](tuple(states), prompt_tokens, prompt_mask)

    def decode(self, states, caches, logits, prompt_tokens, prompt_mask, live, rng, row_stops=None):
        """(SampleOutput, final caches); `caches` are donated (updated in place). row_stops
        int32[B, K]: extra stop ids per prompt, -1 padded."""
        if self._jitted is None:
            self._compile(states)
        if row_stops is None:
            row_stops = jnp.zeros((prompt_tokens.shape[0], 0), jnp.int32)
        return self._jitted[1](tuple(states), caches, logits, prompt_tokens, prompt_mask, live, rng, row_stops)

    def __call__(self, state, prompt_tokens, prompt_mask, rng, proxy_states=(), live=None,
                 row_stops=None) -> SampleOutput:
        states = (state, *proxy_states)
        if len(states) != len(self.graphdefs):
            raise ValueError(f"expected {len(self.graphdefs)} model states; got {len(states)}.")
        if live is None:
            live = jnp.ones((prompt_tokens.shape[0],), bool)
        if row_stops is None:
            row_stops = jnp.zeros((prompt_tokens.shape[0], 0), jnp.int32)
        if self.mesh is not None:
            rules = self.rules or shd.DEFAULT_RULES
            batch2 = shd.batch_sharding(self.mesh, 2, rules, prompt_tokens.shape)
            prompt_tokens, prompt_mask = jax.device_put((prompt_tokens, prompt_mask), batch2)
            live = jax.device_put(live, shd.batch_sharding(self.mesh, 1, rules, live.shape))
            row_stops = jax.device_put(row_stops, shd.batch_sharding(self.mesh, 2, rules, row_stops.shape))
            # its key data, not the typed key: device_put refuses a key array for other hosts' devices
            rng = jax.random.wrap_key_data(jax.device_put(jax.random.key_data(rng), shd.replicated(self.mesh)),
                                           impl=jax.random.key_impl(rng))
        with contextlib.nullcontext() if self.mesh is None else shd.use_mesh(self.mesh, self.rules):
            caches, logits = self.prefill(states, prompt_tokens, prompt_mask)
            return self.decode(states, caches, logits, prompt_tokens, prompt_mask, live, rng, row_stops)[0]


def make_sampler(graphdef, config: SamplingConfig, *, proxy_graphdefs=(), mesh=None, rules=None) -> Sampler:
    """A compiled sampler for models of this structure (`graphdef, state = nnx.split(model)`)."""
    return Sampler(graphdef, config, proxy_graphdefs=proxy_graphdefs, mesh=mesh, rules=rules)


# ---- list-of-prompts front end -----------------------------------------------------------------


def bucket(size: int, minimum: int = 1) -> int:
    """Rounds up to one of four steps per power of two (at most 25% padding), at least `minimum`:
    1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, ...; with minimum 16: 16, 20, 24, 28, 32, 40..."""
    size = max(size, minimum)
    step = max(1, (1 << (size.bit_length() - 1)) // 4)
    return -(-size // step) * step


def left_pad(prompts: Sequence[Sequence[int]], length: int, rows: int, pad_id: int):
    """Ragged token lists -> (tokens int32[rows, length], mask bool[rows, length]), left-padded;
    rows beyond len(prompts) are all padding."""
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = np.asarray(p, np.int32)
            mask[i, length - len(p):] = True
    return tokens, mask


# The shortest prompt bucket. The padded prompt width is the width of every rollout a stage
# trains on and scores, so it is small: the toy's 10-token prompts pad to 10 (16 cost the
# teacher-forced passes a third more work).
PROMPT_BUCKET_MIN = 8

_SAMPLERS: dict = {}


def _sampler_for(graphdefs, config, mesh, rules) -> Sampler:
    key = (graphdefs, config, mesh, rules)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = make_sampler(graphdefs[0], config, proxy_graphdefs=graphdefs[1:], mesh=mesh, rules=rules)
    return _SAMPLERS[key]


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] | None = (), seed: int = 0, *,
             min_p: float = 0.0, pad_id: int = 0, n: int = 1, stop_ids: Sequence[Sequence[int]] | None = None,
             mesh=None, rules=None, proxy=None, refill: int = 0, refill_chunk: int = 32,
             processor=None) -> SampleOutput:
    """Samples `n` completions for each ragged prompt; rows are prompt-major (b * n + j).

    temperature 0 is greedy. A row stops at any of `eos_ids` and, with stop_ids (one list per
    prompt), at its own prompt's stop ids too (finish reason FINISH_EOS either way). proxy=(expert_model, antiexpert_model, alpha) adds
    alpha * (expert - antiexpert) logits at every step (proxy-tuning). With a mesh, the batch
    is split over ("data", "fsdp") and params by their logical axes (`rules`, default
    bridge.sharding.DEFAULT_RULES). The batch is padded to `bucket(len(prompts))` (and to a
    multiple of the batch shards) and the prompt length to `bucket(max_len, PROMPT_BUCKET_MIN)`,
    so calls with nearby sizes share one compilation.

    refill > 0 decodes with that many slots (rows; rounded up to the batch shards) and slot
    refill (`bridge.sampling.refill`): a finished row's slot takes the next waiting row, in
    decode rounds of at most `refill_chunk` steps. Same outputs as the static path.
    processor: `SamplingConfig.processor` (a logits hook by row id and token index).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token.")
    alpha = 0.0 if proxy is None else float(proxy[2])
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                            top_k=int(top_k), min_p=float(min_p), eos_ids=tuple(int(e) for e in eos_ids or ()),
                            pad_id=int(pad_id), n=int(n), proxy_alpha=alpha, processor=processor)
    models = (model,) if proxy is None else (model, proxy[0], proxy[1])
    split = [nnx.split(m) for m in models]
    graphdefs = tuple(g for g, _ in split)
    states = tuple(s for _, s in split)
    rules = None if rules is None else shd.as_rules(rules)
    sampler = _sampler_for(graphdefs, config, mesh, rules)

    shards = 1
    if mesh is not None:
        spec = shd.logical_to_spec(("batch",), rules or shd.DEFAULT_RULES, None, mesh)[0]
        shards = math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec or ()))
    b = len(prompts)
    step = shards // math.gcd(n, shards)  # rows * n must divide evenly over the batch shards
    rows = -(-bucket(b) // step) * step
    tokens, mask = left_pad(prompts, bucket(max(len(p) for p in prompts), PROMPT_BUCKET_MIN), rows, pad_id)
    live = np.arange(rows) < b
    if stop_ids is not None and len(stop_ids) != b:
        raise ValueError(f"stop_ids needs one list per prompt: {len(stop_ids)} lists for {b} prompts.")
    row_stops = np.full((rows, max((len(s) for s in stop_ids or ()), default=0)), -1, np.int32)
    for i, ids in enumerate(stop_ids or ()):
        row_stops[i, :len(ids)] = ids
    states = sampler.place(states)
    if refill:
        slots = min(-(-int(refill) // shards) * shards, -(-(b * n) // shards) * shards)
        key = ("refill", graphdefs, config, mesh, rules, slots, int(refill_chunk))
        if key not in _SAMPLERS:
            from bridge.sampling.refill import RefillSampler

            _SAMPLERS[key] = RefillSampler(graphdefs, tuple(m.config for m in models), config, slots=slots,
                                           chunk=int(refill_chunk), mesh=mesh, rules=rules)
        out = _SAMPLERS[key](states, tokens, mask, jax.random.key(seed), row_stops, b * n)
        return out if rows == b else _first_rows(out, b * n)
    out = sampler(states[0], jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
                  proxy_states=states[1:], live=jnp.asarray(live), row_stops=jnp.asarray(row_stops))
    return out if rows == b else _first_rows(out, b * n)


@functools.partial(jax.jit, static_argnums=1)
def _first_rows(out: SampleOutput, count: int) -> SampleOutput:
    """Drops the batch-padding rows in one dispatch."""
    return jax.tree.map(lambda x: x[:count], out)
