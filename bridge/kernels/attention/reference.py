"""Plain-jnp grouped-query attention: the reference every faster attention is tested against.

    out[b, t, h] = sum_s softmax_s(q[b,t,h] . k[b,h//G,s] / sqrt(Dh) + bias[b,t,s]) v[b,h//G,s]

with G = H / H_kv query heads per key/value head (GQA, Ainslie et al. 2023) and bias 0 where
`mask` is true, a large negative number elsewhere. Softmax runs in float32. Keys and values
are laid out [B, H_kv, S, Dh] (as the KV cache stores them), so both contractions are batched
matmuls over (b, kv head) with no transposed copy of the cache.
"""

import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,T,H,Dh], k/v [B,Hkv,S,Dh], mask bool[B,T,S] -> [B,T,H,Dh] in q's dtype.

    Query rows whose mask is all false (padding) return the mean of v, never NaN.
    """
    b, t, h, dh = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, t, hkv, h // hkv, dh)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (dh**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, dh).astype(q.dtype)
