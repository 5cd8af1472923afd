"""Attention implementations (chunked, and the XLA path GPUs take) against the plain-jnp
reference: values and gradients (f32, rtol 1e-5) on odd shapes, GQA, left padding, fully masked rows and cache-style query slots."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from bridge.kernels.attention import api, chunked, reference


def inputs(b, t, s, h, hkv, dh, offset, seed=0, dtype=jnp.float32):
    """Queries at slots offset..offset+t-1 over s key slots; row 0 left-padded by 3 slots."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, dh), dtype)
    k = jax.random.normal(ks[1], (b, hkv, s, dh), dtype)
    v = jax.random.normal(ks[2], (b, hkv, s, dh), dtype)
    valid = np.ones((b, s), bool)
    valid[0, :3] = False
    return q, k, v, jnp.arange(t, dtype=jnp.int32) + offset, jnp.asarray(valid)


CASES = [  # b, t, s, h, hkv, dh, offset, block_q, block_k
    (2, 13, 13, 4, 2, 8, 0, 4, 5),  # training: T = S, neither divisible by its block
    (1, 7, 20, 6, 3, 16, 9, 3, 8),  # prefill into a cache with earlier slots filled
    (3, 1, 11, 4, 1, 8, 6, 1, 4),  # one decode step, MQA
    (2, 16, 16, 2, 2, 4, 0, 16, 16),  # one block each
]


class ChunkedAttentionTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*CASES)
    def test_equals_reference_in_value_and_gradient(self, b, t, s, h, hkv, dh, offset, bq, bk):
        q, k, v, slots, valid = inputs(b, t, s, h, hkv, dh, offset)
        seen = jnp.any(api.dense_mask(slots, valid), axis=-1)  # [B, T]: rows with a visible key
        weights = jax.random.normal(jax.random.key(7), q.shape) * seen[:, :, None, None]

        def loss(fn):
            return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

        ref = lambda q, k, v: reference.attention(q, k, v, api.dense_mask(slots, valid))  # noqa: E731
        fast = lambda q, k, v: chunked.attention(q, k, v, slots, valid, block_q=bq, block_k=bk)  # noqa: E731
        rows = lambda x: x * seen[:, :, None, None]  # noqa: E731  (rows that see no key: unspecified)
        chex.assert_trees_all_close(rows(self.variant(fast)(q, k, v)), rows(ref(q, k, v)), rtol=1e-5, atol=1e-5)
        grads = self.variant(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
        chex.assert_trees_all_close(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_the_xla_path_gpus_take_equals_reference_in_value_and_gradient(case):
    """`implementation="xla"` (jax.nn.dot_product_attention; the default on GPU, cuDNN flash
    there) runs here on CPU through XLA's own lowering against the reference, GQA included."""
    b, t, s, h, hkv, dh, offset, _, _ = case
    q, k, v, slots, valid = inputs(b, t, s, h, hkv, dh, offset)
    seen = jnp.any(api.dense_mask(slots, valid), axis=-1)
    weights = jax.random.normal(jax.random.key(7), q.shape) * seen[:, :, None, None]
    ref = lambda q, k, v: reference.attention(q, k, v, api.dense_mask(slots, valid))  # noqa: E731
    xla = lambda q, k, v: api.attention(q, k, v, slots, valid, implementation="xla")  # noqa: E731
    rows = lambda x: x * seen[:, :, None, None]  # noqa: E731
    chex.assert_trees_all_close(rows(jax.jit(xla)(q, k, v)), rows(ref(q, k, v)), rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)  # noqa: E731
    chex.assert_trees_all_close(jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v),
                                jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v), rtol=1e-5, atol=1e-5)


def test_rows_with_no_visible_key_are_finite_and_leave_the_others_exact():
    q, k, v, slots, valid = inputs(2, 5, 5, 2, 1, 8, 0)  # row 0: queries 0-2 see nothing
    out = np.asarray(chunked.attention(q, k, v, slots, valid, block_q=2, block_k=2))
    want = np.asarray(reference.attention(q, k, v, api.dense_mask(slots, valid)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 3:], want[0, 3:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], want[1], rtol=1e-5, atol=1e-5)


def test_blocks_in_the_causal_future_are_skipped():
    """Query block 0 (slots 0-3) never reaches key block 1 (slots 4-7): that block's keys and
    values may hold NaN without touching block 0's outputs or its gradients."""
    q, k, v, slots, valid = inputs(1, 8, 8, 2, 1, 4, 0)
    valid = jnp.ones_like(valid)
    poison = lambda x: x.at[:, :, 4:].set(jnp.nan)  # noqa: E731
    f = lambda q, k, v: chunked.attention(q, k, v, slots, valid, block_q=4, block_k=4)[:, :4]  # noqa: E731
    out = f(q, poison(k), poison(v))
    chex.assert_trees_all_close(out, f(q, k, v), rtol=1e-6)
    dq = jax.grad(lambda q: jnp.sum(f(q, poison(k), poison(v))))(q)
    assert np.all(np.isfinite(np.asarray(dq[:, :4])))  # query block 0 never read the poisoned keys


def test_bfloat16_inputs_stay_close_to_float32():
    q, k, v, slots, valid = inputs(2, 9, 9, 4, 2, 16, 0)
    want = reference.attention(q, k, v, api.dense_mask(slots, valid))
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = chunked.attention(*bf, slots, valid, block_q=4, block_k=4)
    assert got.dtype == jnp.bfloat16
    seen = np.asarray(jnp.any(api.dense_mask(slots, valid), axis=-1))  # rows with a visible key
    np.testing.assert_allclose(np.asarray(got, np.float32)[seen], np.asarray(want)[seen], atol=5e-2)


def test_chunked_working_memory_does_not_grow_with_the_square_of_the_length():
    """Compiled temp memory of the gradient at T = S = 4096 (never run): the reference holds
    [B, H, T, T] float32 scores (and their softmax), the chunked kernel only blocks."""
    b, t, h, hkv, dh = 1, 4096, 4, 2, 32
    q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, hkv, t, dh), jnp.float32)
    slots, valid = jax.ShapeDtypeStruct((t,), jnp.int32), jax.ShapeDtypeStruct((b, t), bool)

    def temp(impl):
        f = lambda q, k, v, s, m: jnp.sum(api.attention(q, k, v, s, m, implementation=impl))  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv, slots, valid).compile() \
            .memory_analysis().temp_size_in_bytes

    scores = 4 * b * h * t * t
    assert temp("reference") >= scores
    assert temp("chunked") < scores / 8


def test_dispatch_by_size_and_unknown_implementation():
    assert api.pick_implementation((1, 16, 4, 8), 16) == "reference"
    assert api.pick_implementation((8, 8192, 32, 128), 8192) == "chunked"
    q, k, v, slots, valid = inputs(1, 3, 3, 2, 1, 4, 0)
    with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
        api.attention(q, k, v, slots, valid, implementation="flash")
