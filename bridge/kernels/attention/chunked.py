"""Blocked attention with an online softmax (FlashAttention-2, Dao 2023) in plain jnp.

For each query block i and key block j (scores in float32):

    s_ij = q_i k_j^T / sqrt(Dh)               masked keys -1e30, padding keys -inf
    m_i <- max(m_i, rowmax s_ij);  l_i <- l_i e^(m_old - m_i) + rowsum e^(s_ij - m_i)
    o_i <- o_i e^(m_old - m_i) + e^(s_ij - m_i) v_j;   out_i = o_i / l_i

so no [T, S] score matrix exists; working memory is one [bq, bk] block per (batch, head).
The custom VJP keeps (q, k, v, out, m, l) and recomputes each block's probabilities
p_ij = exp(s_ij - m_i) / l_i (m and l apart, not log-sum-exp: a row that sees no key has
m = -1e30, which would swallow log l):  dv_j = sum_i p_ij^T do_i;  ds_ij = p_ij * (do_i v_j^T - D_i) with
D_i = rowsum(do_i * out_i);  dq_i = sum_j ds_ij k_j / sqrt(Dh);  dk_j = sum_i ds_ij^T q_i / sqrt(Dh).
dq is accumulated over key blocks and (dk, dv) over query blocks in two passes.

The mask is given factored, as the decoder builds it: query t sits at slot query_slots[t] and
sees key slot s when s <= query_slots[t] and key_valid[b, s] (causal plus padding). A key
block that lies wholly after a query block's last slot is skipped (`lax.cond`), so causal
attention does about half the block products. A query with no visible key at all (a left
padding position) gets a finite average of v over the blocks it does compute; nothing
downstream reads such positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = -1e30


def _blocks(x, axis: int, size: int, fill=0):
    """Pads `axis` to a multiple of `size` and moves the block index to the front."""
    n = -(-x.shape[axis] // size)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * size - x.shape[axis])
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _scores(qi, kj, slots_i, kslots_j, valid_j, real_j, scale):
    """(masked scores float32[B, Hkv, G, bq, bk], visible) of one (query block, key block) pair."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    visible = (kslots_j[None, :] <= slots_i[:, None])[None, None, None] & valid_j[:, None, None, None, :]
    s = jnp.where(visible, s, _MASKED)
    return jnp.where(real_j, s, -jnp.inf), visible


def _in_causal_reach(slots_i, kslots_j):
    """Whether any key slot of block j can be visible from query block i (s <= t for some pair)."""
    return jnp.min(kslots_j) <= jnp.max(slots_i)


def _prepare(q, k, v, query_slots, key_valid, block_q, block_k):
    b, t, h, dh = q.shape
    hkv, s = k.shape[1], k.shape[2]
    q = q.reshape(b, t, hkv, h // hkv, dh).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dh]
    return dict(
        q=_blocks(q, 3, block_q), k=_blocks(k, 2, block_k), v=_blocks(v, 2, block_k),
        slots=_blocks(query_slots.astype(jnp.int32), 0, block_q),
        kslots=_blocks(jnp.arange(s, dtype=jnp.int32), 0, block_k),
        valid=_blocks(key_valid.astype(bool), 1, block_k, False),
        real=_blocks(jnp.ones((s,), bool), 0, block_k, False),
        scale=dh ** -0.5)


def _unblock_q(x, b, t, h, dh):
    """[nq, B, Hkv, G, bq, Dh] -> [B, T, H, Dh]."""
    x = jnp.moveaxis(x, 0, 3)  # [B, Hkv, G, nq, bq, Dh]
    x = x.reshape(*x.shape[:3], -1, dh)[:, :, :, :t]
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _forward(q, k, v, query_slots, key_valid, block_q, block_k):
    p = _prepare(q, k, v, query_slots, key_valid, block_q, block_k)

    def query_block(args):
        qi, slots_i = args

        def update(carry, kv):
            m, l, acc = carry
            kj, vj, kslots_j, valid_j, real_j = kv
            s, _ = _scores(qi, kj, slots_i, kslots_j, valid_j, real_j, p["scale"])
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            probs = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(probs, axis=-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        def step(carry, kv):
            return jax.lax.cond(_in_causal_reach(slots_i, kv[2]), update, lambda c, _: c, carry, kv), None

        stats = qi.shape[:-1]
        init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros(qi.shape, jnp.float32))
        # checkpoint: when this forward is itself partially evaluated (a rematerialized layer),
        # JAX would otherwise stack every block's mask as a scan residual, [nq, nk, ..., bq, bk].
        step = jax.checkpoint(step, prevent_cse=False)
        (m, l, acc), _ = jax.lax.scan(step, init, (p["k"], p["v"], p["kslots"], p["valid"], p["real"]))
        return acc / l[..., None], (m, l)

    out, stats = jax.lax.map(query_block, (p["q"], p["slots"]))
    return out, stats, p


def _attention_fwd(q, k, v, query_slots, key_valid, block_q, block_k):
    out_blocks, stats, _ = _forward(q, k, v, query_slots, key_valid, block_q, block_k)
    out = _unblock_q(out_blocks, *q.shape).astype(q.dtype)
    return out, (q, k, v, query_slots, key_valid, out, stats)


def _attention_bwd(block_q, block_k, residuals, d_out):
    q, k, v, query_slots, key_valid, out, stats = residuals
    b, t, h, dh = q.shape
    hkv, s = k.shape[1], k.shape[2]
    p = _prepare(q, k, v, query_slots, key_valid, block_q, block_k)
    reshape = lambda x: _blocks(x.reshape(b, t, hkv, h // hkv, dh).transpose(0, 2, 3, 1, 4), 3, block_q)  # noqa: E731
    do = reshape(d_out)
    delta = jnp.sum(do.astype(jnp.float32) * reshape(out).astype(jnp.float32), axis=-1)  # [nq, B, Hkv, G, bq]
    scale = p["scale"]

    def grads_of_scores(qi, doi, stats_i, delta_i, slots_i, kj, vj, kslots_j, valid_j, real_j):
        s, visible = _scores(qi, kj, slots_i, kslots_j, valid_j, real_j, scale)
        probs = jnp.exp(s - stats_i[0][..., None]) / stats_i[1][..., None]
        dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
        return probs, jnp.where(visible, probs * (dp - delta_i[..., None]), 0.0)  # masked scores are constants

    keys = (p["k"], p["v"], p["kslots"], p["valid"], p["real"])
    queries = (p["q"], do, stats, delta, p["slots"])

    def dq_block(args):
        def update(dq, kv):
            _, ds = grads_of_scores(*args, *kv)
            return dq + jnp.einsum("bkgqs,bksd->bkgqd", ds, kv[0], preferred_element_type=jnp.float32)

        def step(dq, kv):
            return jax.lax.cond(_in_causal_reach(args[4], kv[2]), update, lambda c, _: c, dq, kv), None

        dq, _ = jax.lax.scan(step, jnp.zeros(args[0].shape, jnp.float32), keys)
        return dq * scale

    def dkv_block(kv):
        def update(carry, args):
            dk, dv = carry
            probs, ds = grads_of_scores(*args, *kv)
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", probs.astype(args[1].dtype), args[1],
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, args[0], preferred_element_type=jnp.float32)
            return dk, dv

        def step(carry, args):
            return jax.lax.cond(_in_causal_reach(args[4], kv[2]), update, lambda c, _: c, carry, args), None

        zeros = jnp.zeros(kv[0].shape, jnp.float32)
        (dk, dv), _ = jax.lax.scan(step, (zeros, zeros), queries)
        return dk * scale, dv

    dq = _unblock_q(jax.lax.map(dq_block, queries), b, t, h, dh)
    dk, dv = jax.lax.map(dkv_block, keys)
    unblock_k = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, hkv, -1, dh)[:, :, :s]  # noqa: E731
    return (dq.astype(q.dtype), unblock_k(dk).astype(k.dtype), unblock_k(dv).astype(v.dtype), None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, query_slots, key_valid, block_q, block_k):
    return _attention_fwd(q, k, v, query_slots, key_valid, block_q, block_k)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, query_slots: jax.Array, key_valid: jax.Array, *,
              block_q: int = 512, block_k: int = 512) -> jax.Array:
    """q [B,T,H,Dh], k/v [B,Hkv,S,Dh], query_slots int[T], key_valid bool[B,S] -> [B,T,H,Dh]."""
    t, s = q.shape[1], k.shape[2]
    return _attention(q, k, v, query_slots, key_valid, min(block_q, t), min(block_k, s))
