"""One decoder for the Qwen3, Qwen2/2.5 and Llama 3 families, in Flax NNX.

    h_0 = embed(x);  h_{l+1} = h_l' + MLP(norm(h_l')),  h_l' = h_l + Attn(norm(h_l))
    logits = norm(h_L) @ W_head          (W_head = embed^T when tied)

Attn is grouped-query attention with rotary position embeddings (RoPE, Su et al. 2021;
Llama 3 frequency scaling), optional q/k RMSNorm per head (Qwen3) and q/k/v biases (Qwen2).
MLP is SwiGLU: down(silu(gate(x)) * up(x)). Every parameter carries logical axis names in
its `axes` metadata; `bridge.sharding` maps them to mesh axes with the config's rules.

The same forward serves training (no cache: causal mask over the sequence and an optional
padding mask) and sampling (a `KVCache` written at slot `cache.index`, per-row positions).

With `config.scan_layers` (MaxText's scan_layers) the blocks' parameters are stacked on a
leading "layers" axis and applied with one `lax.scan`, so compile time and program size do
not grow with depth; the default unrolls a Python loop over separate blocks, which decodes
faster on CPU at toy sizes. Both load and save the same Hugging Face tensors.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge.models.config import ModelConfig
from bridge.sharding import constrain
from bridge.kernels.attention.api import attention


@flax.struct.dataclass
class KVCache:
    """Keys/values per layer, slot validity bool[B, S], next slot int32[].

    k and v are tuples of per-layer [B, H_kv, S, Dh] arrays, or with `scan_layers` one array
    [L, B, H_kv, S, Dh] each; either way the last four axes are (batch, kv heads, slots,
    head dim), so code that pads or repeats a cache works on both (`jax.tree.map` over k, v).
    """

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        dtype = dtype or cfg.dtype
        if cfg.scan_layers:
            k, v = (jnp.zeros((cfg.num_layers, *shape), dtype) for _ in range(2))
        else:
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)) for _ in range(2))
        return cls(k=k, v=v, valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.valid.shape[1]


ACTIVATION_AXES = ("batch", "length", None)  # the residual stream: rows over the batch axes


def _normal(rngs: nnx.Rngs, shape, std, dtype):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical axes."""

    def __init__(self, din, dout, axes, *, bias, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (din, dout), 0.02, cfg.param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), cfg.param_dtype), axes=axes[1:]) if bias else None
        self.dtype = cfg.dtype

    def __call__(self, x):
        # As one 2-D matmul over the flattened leading axes: XLA on CPU runs the gradient's
        # [..., in] x [..., out] contraction over several axes far slower than over one.
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y.reshape(*lead, y.shape[-1])
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim, axis_name, *, eps, cfg: ModelConfig):
        self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), axes=(axis_name,))
        self.eps = eps
        self.dtype = cfg.dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """theta^(-2i/Dh) for i < Dh/2, with Llama 3 scaling of the low frequencies when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    if not cfg.rope_scaling:
        return inv
    p = cfg.rope_params
    factor, lo, hi, old = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                           p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates halves of the last axis: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Dense(d, h * hd, ("embed", "heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k_proj = Dense(d, kv * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.v_proj = Dense(d, kv * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.o_proj = Dense(h * hd, d, ("heads", "embed"), bias=cfg.o_bias, cfg=cfg, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, "head_dim", eps=cfg.rms_norm_eps, cfg=cfg)
            self.k_norm = RMSNorm(hd, "head_dim", eps=cfg.rms_norm_eps, cfg=cfg)
        else:
            self.q_norm = self.k_norm = None
        self.shape = (h, kv, hd)

    def __call__(self, x, positions, inv_freq, mask, kv=None, write_index=None):
        """x [B,T,D]; mask (query_slots int[T], key_valid bool[B,S]) as in `bridge.kernels.attention`;
        kv: this layer's cached (k, v) [B,Hkv,S,Dh] or None. Returns (out, kv)."""
        b, t, _ = x.shape
        h, nkv, hd = self.shape
        q = self.q_proj(x).reshape(b, t, h, hd)
        k = self.k_proj(x).reshape(b, t, nkv, hd)
        v = self.v_proj(x).reshape(b, t, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh], the cache layout
        if kv is not None:
            ck, cv = kv
            zero = jnp.zeros((), jnp.int32)
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (zero, zero, write_index, zero))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (zero, zero, write_index, zero))
            kv = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), *mask)
        return self.o_proj(out.reshape(b, t, h * hd)), kv


class MLP(nnx.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Dense(d, f, ("embed", "mlp"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.up_proj = Dense(d, f, ("embed", "mlp"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.down_proj = Dense(f, d, ("mlp", "embed"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, "norm", eps=cfg.rms_norm_eps, cfg=cfg)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, "norm", eps=cfg.rms_norm_eps, cfg=cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, inv_freq, mask, kv=None, write_index=None):
        a, kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, mask, kv, write_index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One `Block` whose parameters carry a leading [num_layers] axis, named "layers"."""
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    state = jax.vmap(lambda key: nnx.state(Block(cfg, rngs=nnx.Rngs(params=key))))(keys)
    state = jax.tree.map(lambda v: v.replace(axes=("layers", *v.get_metadata()["axes"])), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0)))), state)


class Decoder(nnx.Module):
    """Causal LM. `model(ids)` -> logits float32[B, T, V]; `model.hidden_states` for kernels."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), 0.02, cfg.param_dtype),
                               axes=("vocab", "embed"))
        if cfg.scan_layers:
            self.layers = stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, "norm", eps=cfg.rms_norm_eps, cfg=cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(
            _normal(rngs, (cfg.hidden_size, cfg.vocab_size), 0.02, cfg.param_dtype), axes=("embed", "vocab"))

    def head(self) -> jax.Array:
        """Output projection [D, V] in the compute dtype (the transposed embedding when tied)."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.config.dtype)

    def hidden_states(self, input_ids, *, positions=None, attention_mask=None, cache=None):
        """Final-norm hidden states [B, T, D] (and the updated cache when one is given).

        input_ids int[B, T]; attention_mask bool[B, T] (false on padding); positions int[B, T]
        default to the count of real tokens before each one. With `cache`, tokens are written
        at slots cache.index .. cache.index+T-1 and attend to every valid earlier slot.
        """
        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        inv_freq = rope_inverse_frequencies(cfg)
        x = constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(cfg.dtype), ACTIVATION_AXES)
        if cache is None:  # query t sees key s <= t that is not padding
            mask = (jnp.arange(t), attention_mask)
        else:
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
            mask = (cache.index + jnp.arange(t), valid)
        run = self._scanned_blocks if cfg.scan_layers else self._unrolled_blocks
        x, kv = run(x, positions, inv_freq, mask, cache)
        x = self.norm(x)
        if cache is None:
            return x
        return x, KVCache(k=kv[0], v=kv[1], valid=valid, index=cache.index + t)

    def _unrolled_blocks(self, x, positions, inv_freq, mask, cache):
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            step = nnx.remat(type(layer).__call__) if self.config.remat else type(layer).__call__
            x, kv = step(layer, x, positions, inv_freq, mask, kv, None if cache is None else cache.index)
            x = constrain(x, ACTIVATION_AXES)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return x, (tuple(new_k), tuple(new_v))

    def _scanned_blocks(self, x, positions, inv_freq, mask, cache):
        """lax.scan over the stacked blocks. The stacked cache rides in the carry and only the
        new tokens' slots are written into it, so a decode step updates it in place."""
        graphdef, params = nnx.split(self.layers)
        t = x.shape[1]

        def body(carry, layer_params):
            x, i, kv = carry
            block = nnx.merge(graphdef, layer_params)
            if kv is None:
                return (constrain(block(x, positions, inv_freq, mask)[0], ACTIVATION_AXES), i + 1, None), None
            ks, vs = kv
            layer_kv = (jax.lax.dynamic_index_in_dim(ks, i, keepdims=False),
                        jax.lax.dynamic_index_in_dim(vs, i, keepdims=False))
            x, (k, v) = block(x, positions, inv_freq, mask, layer_kv, cache.index)
            x = constrain(x, ACTIVATION_AXES)
            zero = jnp.zeros((), jnp.int32)
            start = (i, zero, zero, cache.index, zero)
            new = lambda full: jax.lax.dynamic_slice_in_dim(full, cache.index, t, axis=2)[None]  # noqa: E731
            kv = (jax.lax.dynamic_update_slice(ks, new(k), start), jax.lax.dynamic_update_slice(vs, new(v), start))
            return (x, i + 1, kv), None

        if self.config.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        kv = None if cache is None else (cache.k, cache.v)
        (x, _, kv), _ = jax.lax.scan(body, (x, jnp.zeros((), jnp.int32), kv), params)
        return x, kv

    def __call__(self, input_ids, *, positions=None, attention_mask=None, cache=None):
        """Logits float32[B, T, V] (and the updated cache when one is given)."""
        out = self.hidden_states(input_ids, positions=positions, attention_mask=attention_mask, cache=cache)
        h, new_cache = (out, None) if cache is None else out
        logits = jnp.dot(h, self.head(), preferred_element_type=jnp.float32)
        return logits if cache is None else (logits, new_cache)
