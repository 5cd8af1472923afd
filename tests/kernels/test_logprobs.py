"""bridge.kernels.logprobs.token_logprobs: every implementation against a NumPy reference (values
and analytic gradients) and against autodiff of the plain-jnp reference, on odd shapes."""
import unittest.mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from bridge.kernels.logprobs import api, chunked, reference, token_logprobs

# Odd shapes: T = 37 is not a multiple of the chunk (16), V = 1007 is not a power of two.
B, T, D, V = 2, 37, 24, 1000 + 7
TEMPERATURE = 0.7
ENTROPY_WEIGHT = 0.3
RTOL, ATOL = 1e-5, 1e-6

IMPLEMENTATIONS = (
    ("auto", None, None),
    ("reference", "reference", None),
    ("chunked_16", "chunked", 16),
    ("chunked_1", "chunked", 1),
    ("chunked_default", "chunked", None),
    ("chunked_larger_than_n", "chunked", 128),
)


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    head = (0.4 * rng.normal(size=(D, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
    return hidden, head, targets, mask


def numpy_logprobs(hidden, head, targets, temperature):
    """float64 log softmax(h @ W / temperature)[target] and entropy, plus the pieces of the
    gradient: probabilities and log-probabilities over the vocabulary."""
    logits = hidden.astype(np.float64) @ head.astype(np.float64) / temperature
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    logp = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    entropy = -(np.exp(log_probs) * log_probs).sum(axis=-1)
    return logp, entropy, log_probs


def numpy_masked_loss_gradients(hidden, head, targets, mask, temperature, entropy_weight):
    """Gradients of sum(mask * logp) + entropy_weight * sum(mask * entropy) wrt (h, W):
    dlogp/dz = onehot - p, dH/dz = -p (log p + H), z = h @ W / temperature."""
    _, entropy, log_probs = numpy_logprobs(hidden, head, targets, temperature)
    probs = np.exp(log_probs)
    one_hot = np.eye(head.shape[1])[targets]
    d_logits = mask[..., None] * (one_hot - probs)
    d_logits -= entropy_weight * mask[..., None] * probs * (log_probs + entropy[..., None])
    d_logits /= temperature
    d_hidden = d_logits @ head.astype(np.float64).T
    d_head = np.einsum("btd,btv->dv", hidden.astype(np.float64), d_logits)
    return d_hidden, d_head


def small_head_gradient_tiles():
    """Force the in-place tiled head-gradient update (128-column tiles, last tile shifted)."""
    return unittest.mock.patch.object(chunked, "HEAD_GRADIENT_TILE_BYTES", 4 * D * 128)


class TokenLogprobsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*IMPLEMENTATIONS)
    def test_values_and_entropy_match_numpy(self, implementation, chunk_size):
        hidden, head, targets, _ = make_inputs()
        fn = self.variant(lambda h, w, t: token_logprobs(
            h, w, t, TEMPERATURE, return_entropy=True, chunk_size=chunk_size,
            implementation=implementation))
        logp, entropy = fn(hidden, head, targets)
        expected_logp, expected_entropy, _ = numpy_logprobs(hidden, head, targets, TEMPERATURE)
        chex.assert_shape((logp, entropy), (B, T))
        assert logp.dtype == entropy.dtype == jnp.float32
        chex.assert_trees_all_close(logp, expected_logp, rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(entropy, expected_entropy, rtol=RTOL, atol=ATOL)
        logp_only = self.variant(lambda h, w, t: token_logprobs(
            h, w, t, TEMPERATURE, chunk_size=chunk_size, implementation=implementation))
        chex.assert_trees_all_close(logp_only(hidden, head, targets), expected_logp,
                                    rtol=RTOL, atol=ATOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        implementation=("reference", "chunked"), chunk_size=(16, None),
        tiled_head_gradient=(False, True), with_entropy=(False, True))
    def test_masked_gradients_match_numpy_and_reference(
            self, implementation, chunk_size, tiled_head_gradient, with_entropy):
        hidden, head, targets, mask = make_inputs(seed=1)
        entropy_weight = ENTROPY_WEIGHT if with_entropy else 0.0

        def masked_loss(h, w, impl):
            if not with_entropy:
                logp = token_logprobs(h, w, targets, TEMPERATURE, chunk_size=chunk_size,
                                      implementation=impl)
                return jnp.sum(mask * logp)
            logp, entropy = token_logprobs(h, w, targets, TEMPERATURE, return_entropy=True,
                                           chunk_size=chunk_size, implementation=impl)
            return jnp.sum(mask * logp) + entropy_weight * jnp.sum(mask * entropy)

        grad_fn = self.variant(jax.grad(lambda h, w: masked_loss(h, w, implementation),
                                        argnums=(0, 1)))
        if tiled_head_gradient:
            with small_head_gradient_tiles():
                grads = grad_fn(hidden, head)
        else:
            grads = grad_fn(hidden, head)
        reference_grads = jax.grad(lambda h, w: masked_loss(h, w, "reference"),
                                   argnums=(0, 1))(hidden, head)
        numpy_grads = numpy_masked_loss_gradients(hidden, head, targets, mask, TEMPERATURE,
                                                  entropy_weight)
        chex.assert_trees_all_close(grads, reference_grads, rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(grads, numpy_grads, rtol=RTOL, atol=ATOL)
        # Masked positions get exactly zero gradient.
        np.testing.assert_array_equal(np.asarray(grads[0])[mask == 0], 0.0)

    @parameterized.named_parameters(("reference", "reference"), ("chunked", "chunked"))
    def test_bfloat16_inputs_give_float32_logprobs_and_input_dtype_gradients(self, implementation):
        hidden, head, targets, mask = make_inputs(seed=2)
        hidden_bf16, head_bf16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(head, jnp.bfloat16)
        logp = token_logprobs(hidden_bf16, head_bf16, targets, chunk_size=16,
                              implementation=implementation)
        assert logp.dtype == jnp.float32
        # Float32 accumulation: equal to float64 math on the bfloat16-rounded inputs.
        expected, _, _ = numpy_logprobs(np.asarray(hidden_bf16, np.float32),
                                        np.asarray(head_bf16, np.float32), targets, 1.0)
        chex.assert_trees_all_close(logp, expected, rtol=RTOL, atol=1e-5)
        d_hidden, d_head = jax.grad(
            lambda h, w: jnp.sum(mask * token_logprobs(h, w, targets, chunk_size=16,
                                                       implementation=implementation)),
            argnums=(0, 1))(hidden_bf16, head_bf16)
        assert d_hidden.dtype == d_head.dtype == jnp.bfloat16

    def test_extra_leading_axes(self):
        hidden, head, targets, _ = make_inputs(seed=3)
        logp = token_logprobs(hidden.reshape(1, B, T, D), head, targets.reshape(1, B, T),
                              implementation="chunked", chunk_size=16)
        expected, _, _ = numpy_logprobs(hidden, head, targets, 1.0)
        chex.assert_trees_all_close(logp[0], expected, rtol=RTOL, atol=ATOL)


def uses_custom_vjp(fn, *args):
    return any(eqn.primitive.name == "custom_vjp_call" for eqn in jax.make_jaxpr(fn)(*args).eqns)


def test_auto_dispatch_picks_reference_when_small_and_chunked_when_large():
    hidden, head, targets, _ = make_inputs()
    assert not uses_custom_vjp(lambda h, w, t: token_logprobs(h, w, t), hidden, head, targets)
    with unittest.mock.patch.object(api, "REFERENCE_MAX_LOGITS_BYTES", B * T * V * 4 - 1):
        assert uses_custom_vjp(lambda h, w, t: token_logprobs(h, w, t), hidden, head, targets)
    assert uses_custom_vjp(lambda h, w, t: token_logprobs(h, w, t, implementation="chunked"),
                           hidden, head, targets)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(implementation="pallas_typo"), ValueError, "unknown implementation"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(chunk_size=0, implementation="chunked"), ValueError, "chunk_size must be"),
])
def test_invalid_arguments_raise(kwargs, error, match):
    hidden, head, targets, _ = make_inputs()
    with pytest.raises(error, match=match):
        token_logprobs(hidden, head, targets, **kwargs)


def test_mismatched_shapes_raise():
    hidden, head, targets, _ = make_inputs()
    with pytest.raises(ValueError, match="head must be"):
        token_logprobs(hidden, head.T, targets)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, head, targets[:, :-1])


def test_traced_temperature_is_rejected_with_a_clear_message():
    hidden, head, targets, _ = make_inputs()
    with pytest.raises(TypeError, match="temperature must be a Python number"):
        jax.jit(token_logprobs)(hidden, head, targets, 0.5)


def temp_bytes(fn, *shapes):
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_chunked_gradient_never_holds_the_logits():
    """Compile only: N = 2048 tokens, V = 8192 -> 64 MiB of float32 logits; the chunked
    gradient's temporaries must stay far below that, the reference's cannot."""
    n_tokens, width, vocab = 2048, 64, 8192
    materialized = n_tokens * vocab * 4
    shapes = (jax.ShapeDtypeStruct((4, n_tokens // 4, width), jnp.float32),
              jax.ShapeDtypeStruct((width, vocab), jnp.float32),
              jax.ShapeDtypeStruct((4, n_tokens // 4), jnp.int32))

    def grad_of(implementation):
        return jax.grad(lambda h, w, t: jnp.sum(sum(token_logprobs(
            h, w, t, return_entropy=True, chunk_size=64, implementation=implementation))),
            argnums=(0, 1))

    chunked_temp = temp_bytes(grad_of("chunked"), *shapes)
    reference_temp = temp_bytes(grad_of("reference"), *shapes)
    assert reference_temp >= materialized
    assert chunked_temp < materialized / 8, (chunked_temp, materialized)


def test_reference_module_matches_numpy_directly():
    hidden, head, targets, _ = make_inputs(seed=4)
    logp, entropy = reference.token_logprobs(hidden, head, targets, 1.3, return_entropy=True)
    expected_logp, expected_entropy, _ = numpy_logprobs(hidden, head, targets, 1.3)
    chex.assert_trees_all_close((logp, entropy), (expected_logp, expected_entropy),
                                rtol=RTOL, atol=ATOL)


def test_inside_shard_map_over_the_batch_matches_the_reference():
    """Data parallel use: hidden/targets sharded over 8 devices, head replicated. The chunked
    backward psums the replicated head's gradient over the shards; values and gradients
    equal the single-device reference."""
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(5)
    hidden = rng.normal(size=(8, 5, D)).astype(np.float32)
    head = (0.4 * rng.normal(size=(D, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(8, 5)).astype(np.int32)
    expected = jax.value_and_grad(lambda h, w: jnp.sum(token_logprobs(
        h, w, targets, TEMPERATURE, implementation="reference")), argnums=(0, 1))(hidden, head)
    with jax.set_mesh(mesh):
        local = jax.shard_map(
            lambda h, w, t: token_logprobs(h, w, t, TEMPERATURE, chunk_size=4,
                                           implementation="chunked"),
            in_specs=(P("data"), P(), P("data")), out_specs=P("data"))
        sharded_targets = jax.device_put(targets, P("data"))
        value_and_grad = jax.jit(jax.value_and_grad(
            lambda h, w: jnp.sum(local(h, w, sharded_targets)), argnums=(0, 1)))
        args = (jax.device_put(hidden, P("data")), jax.device_put(head, P()))
        result = jax.device_get(value_and_grad(*args))
    chex.assert_trees_all_close(result, expected, rtol=RTOL, atol=ATOL)
