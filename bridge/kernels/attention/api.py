"""Attention dispatch: `attention(q, k, v, query_slots, key_valid, implementation=None)`.

The mask is factored as the decoder builds it: query t sits at slot query_slots[t] and sees
key slot s when s <= query_slots[t] and key_valid[b, s] (causal plus padding).

"reference": plain jnp over a materialized [B, T, S] mask and scores (`reference.py`).
"chunked": blocked online-softmax attention with a custom VJP (`chunked.py`): working memory
    one [block_q, block_k] score block per (batch, head), for long sequences on any backend.
"xla": `jax.nn.dot_product_attention`, which lowers to cuDNN flash attention on GPUs.
None picks "xla" on GPU; elsewhere "chunked" once the float32 scores would pass
CHUNKED_ABOVE_BYTES, else "reference" (faster at small sizes). All are tested against the reference.
"""

import math

import jax
import jax.numpy as jnp

from bridge.kernels.attention import chunked, reference

CHUNKED_ABOVE_BYTES = 64 << 20


def dense_mask(query_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
    """bool[B, T, S]: key slot s visible from query t (s <= query_slots[t] and key_valid[b, s])."""
    s = key_valid.shape[1]
    return (jnp.arange(s)[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :].astype(bool)


def pick_implementation(q_shape, s: int) -> str:
    if jax.default_backend() == "gpu":
        return "xla"
    b, t, h, _ = q_shape
    return "chunked" if 4 * math.prod((b, t, h, s)) > CHUNKED_ABOVE_BYTES else "reference"


def attention(q, k, v, query_slots, key_valid, implementation: str | None = None):
    """q [B,T,H,Dh], k/v [B,Hkv,S,Dh], query_slots int[T], key_valid bool[B,S] -> [B,T,H,Dh]."""
    implementation = implementation or pick_implementation(q.shape, k.shape[2])
    if implementation == "reference":
        return reference.attention(q, k, v, dense_mask(query_slots, key_valid))
    if implementation == "chunked":
        return chunked.attention(q, k, v, query_slots, key_valid)
    if implementation == "xla":
        mask = dense_mask(query_slots, key_valid)[:, None, :, :]
        return jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask)
    raise ValueError(f"Unknown attention implementation {implementation!r}; use 'reference', 'chunked' or 'xla'.")
