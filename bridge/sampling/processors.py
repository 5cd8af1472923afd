"""Logit processors: small pure functions float32[B, V] -> float32[B, V] (plus stop handling).

Each filter keeps a token's logit or replaces it by -inf; the sampler draws from
softmax(process(logits)) and reports log_softmax(logits / T)[token], the token's
log-probability before truncation: the quantity the trainer recomputes, so the two differ
only by sampler/trainer numerics (what truncated importance sampling corrects), never by
the truncation. Order, as in transformers and vLLM:

    z = logits / T  ->  top_k  ->  top_p  ->  min_p

- temperature (T > 0): z = logits / T.
- top-k (Fan et al. 2018): keep the k largest z (ties at the k-th value are kept).
- top-p / nucleus (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
  probability reaches p; the most likely token is always kept.
- min-p (Nguyen et al. 2024): keep tokens with prob >= min_p * max prob, i.e.
  z >= max(z) + log(min_p).
- proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy"):
  logits + alpha * (logits_expert - logits_antiexpert), applied before all the above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """z = logits / T for T > 0 (T = 0 means greedy and is handled by the sampler)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here (0 = greedy in the sampler); got {temperature}.")
    return logits if temperature == 1.0 else logits / temperature


def scoring_temperature(temperature: float) -> float:
    """The temperature a sampled token is scored at (by a trainer, or to compare two models):
    the sampling temperature, or 1 for greedy decoding (temperature 0)."""
    return float(temperature) if temperature > 0 else 1.0


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits per row (all of them when k <= 0 or k >= V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: jax.Array, p: float, candidates: int = 0) -> jax.Array:
    """Nucleus filter: keeps token i iff the probability of all tokens strictly more likely
    than i is below p. `candidates` > 0 says at most that many tokens are finite (after a
    top-k), so only those are sorted."""
    if p >= 1.0:
        return logits
    v = logits.shape[-1]
    width = candidates if 0 < candidates < v else v
    sorted_desc = jax.lax.top_k(logits, width)[0] if width < v else -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p
    # smallest kept logit = the threshold; keep[0] is always true since mass_before[0] = 0.
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    """Keeps tokens whose probability is at least min_p times the largest probability."""
    if min_p <= 0.0:
        return logits
    cutoff = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)
    return jnp.where(logits >= cutoff, logits, NEG_INF)


def proxy_tune(logits: jax.Array, expert: jax.Array, antiexpert: jax.Array, alpha: float) -> jax.Array:
    """logits + alpha * (expert - antiexpert): decoding-time guidance by a tuned/untuned pair."""
    return logits + alpha * (expert - antiexpert)


def truncate(z: jax.Array, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> jax.Array:
    """The filters in order: top-k, top-p, min-p (on temperature-scaled logits)."""
    z = top_k_filter(z, top_k)
    z = top_p_filter(z, top_p, candidates=top_k)
    return min_p_filter(z, min_p)


def process(logits: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
            min_p: float = 0.0) -> jax.Array:
    """The full chain for T > 0: temperature, top-k, top-p, min-p (float32 in and out)."""
    z = apply_temperature(logits.astype(jnp.float32), temperature)
    return truncate(z, top_k=top_k, top_p=top_p, min_p=min_p)


def is_row_stop(tokens: jax.Array, row_stops: jax.Array) -> jax.Array:
    """bool like tokens (int[R] or int[R, N]): the token is one of its own row's stop ids,
    row_stops int32[R, K] padded with -1 (K may be 0)."""
    per_row = row_stops if tokens.ndim == 1 else row_stops[:, None, :]
    return jnp.any(tokens[..., None] == per_row, axis=-1)


def is_stop(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """bool, true where a token is one of the stop/eos ids (all false when there are none)."""
    stop = jnp.zeros(tokens.shape, bool)
    for e in eos_ids:
        stop = stop | (tokens == e)
    return stop
