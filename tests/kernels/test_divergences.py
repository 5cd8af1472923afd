"""bridge.kernels.logprobs.token_divergence: every kind (full vocabulary and top-k) against a NumPy
reference, chunked gradients against autodiff of the plain-jnp reference, teacher
stop-gradient, and a compile-only memory check."""
import functools
import unittest.mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from bridge.kernels.logprobs import chunked, token_divergence, token_logprobs

# Odd shapes; teacher and student share V but not the hidden size.
B, T, V = 2, 37, 1000 + 7
D_STUDENT, D_TEACHER = 24, 16
TEMPERATURE = 1.3
BETA = 0.3
TOP_K = 5
RTOL, ATOL = 1e-5, 1e-6
KINDS = ("forward_kl", "reverse_kl", "jsd", "forward_ce")


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    student_hidden = rng.normal(size=(B, T, D_STUDENT)).astype(np.float32)
    student_head = (0.4 * rng.normal(size=(D_STUDENT, V))).astype(np.float32)
    teacher_hidden = rng.normal(size=(B, T, D_TEACHER)).astype(np.float32)
    teacher_head = (0.6 * rng.normal(size=(D_TEACHER, V))).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
    return student_hidden, student_head, teacher_hidden, teacher_head, mask


def numpy_log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def numpy_top_k_bins(log_probs, teacher_log_probs, k):
    """Teacher's k most likely tokens, then log of the remaining mass."""
    top = np.argsort(-teacher_log_probs, axis=-1)[..., :k]
    rest = np.ones(log_probs.shape, bool)
    np.put_along_axis(rest, top, False, axis=-1)
    tail_mass = np.where(rest, np.exp(log_probs), 0.0).sum(axis=-1, keepdims=True)
    return np.concatenate([np.take_along_axis(log_probs, top, axis=-1), np.log(tail_mass)], -1)


def numpy_divergence(student_hidden, student_head, teacher_hidden, teacher_head, kind,
                     beta=BETA, top_k=0, temperature=TEMPERATURE):
    log_s = numpy_log_softmax(student_hidden.astype(np.float64) @ student_head / temperature)
    log_t = numpy_log_softmax(teacher_hidden.astype(np.float64) @ teacher_head / temperature)
    if top_k:
        log_s, log_t = numpy_top_k_bins(log_s, log_t, top_k), numpy_top_k_bins(log_t, log_t, top_k)
    p_s, p_t = np.exp(log_s), np.exp(log_t)

    def kl(log_p, log_q):
        return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)

    if kind == "forward_kl":
        return kl(log_t, log_s)
    if kind == "reverse_kl":
        return kl(log_s, log_t)
    if kind == "forward_ce":
        return -(p_t * log_s).sum(axis=-1)
    if beta == 0.0:
        return kl(log_t, log_s)
    if beta == 1.0:
        return kl(log_s, log_t)
    log_m = np.log((1.0 - beta) * p_s + beta * p_t)
    return beta * kl(log_t, log_m) + (1.0 - beta) * kl(log_s, log_m)


class TokenDivergenceTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(kind=KINDS, top_k=(0, TOP_K),
                           implementation=("reference", "chunked"))
    def test_values_match_numpy(self, kind, top_k, implementation):
        student_hidden, student_head, teacher_hidden, teacher_head, _ = make_inputs()
        fn = self.variant(lambda sh, sw, th, tw: token_divergence(
            sh, sw, th, tw, kind, beta=BETA, top_k=top_k, temperature=TEMPERATURE,
            chunk_size=16, implementation=implementation))
        divergence = fn(student_hidden, student_head, teacher_hidden, teacher_head)
        expected = numpy_divergence(student_hidden, student_head, teacher_hidden, teacher_head,
                                    kind, top_k=top_k)
        chex.assert_shape(divergence, (B, T))
        assert divergence.dtype == jnp.float32
        chex.assert_trees_all_close(divergence, expected, rtol=RTOL, atol=ATOL)

    @parameterized.product(beta=(0.0, 1.0), top_k=(0, TOP_K))
    def test_jsd_endpoints_are_the_two_kls(self, beta, top_k):
        inputs = make_inputs(seed=1)[:4]
        jsd = token_divergence(*inputs, "jsd", beta=beta, top_k=top_k, temperature=TEMPERATURE,
                               chunk_size=16, implementation="chunked")
        kl = token_divergence(*inputs, "forward_kl" if beta == 0.0 else "reverse_kl",
                              top_k=top_k, temperature=TEMPERATURE, implementation="reference")
        chex.assert_trees_all_close(jsd, kl, rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(
            jsd, numpy_divergence(*inputs, "jsd", beta=beta, top_k=top_k), rtol=RTOL, atol=ATOL)

    @parameterized.product(beta=(1e-3, 1.0 - 1e-3), top_k=(0, TOP_K))
    def test_jsd_near_the_endpoints_matches_the_float64_formula(self, beta, top_k):
        """Near beta = 0 and 1 the kernel follows the mixture formula itself (NumPy float64,
        no endpoint branch): the endpoint special cases do not leak into their neighbours."""
        inputs = make_inputs(seed=1)[:4]
        jsd = token_divergence(*inputs, "jsd", beta=beta, top_k=top_k, temperature=TEMPERATURE,
                               chunk_size=16, implementation="chunked")
        chex.assert_trees_all_close(
            jsd, numpy_divergence(*inputs, "jsd", beta=beta, top_k=top_k), rtol=1e-4, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        *[(kind, 0, False) for kind in KINDS], *[(kind, TOP_K, True) for kind in KINDS],
        ("jsd", 0, True), ("forward_kl", TOP_K, False))
    def test_masked_student_gradients_match_reference(self, kind, top_k, tiled_head_gradient):
        student_hidden, student_head, teacher_hidden, teacher_head, mask = make_inputs(seed=2)

        def masked_loss(implementation):
            def loss(sh, sw, th, tw):
                return jnp.sum(mask * token_divergence(
                    sh, sw, th, tw, kind, beta=BETA, top_k=top_k, temperature=TEMPERATURE,
                    chunk_size=16, implementation=implementation))
            return loss

        args = (student_hidden, student_head, teacher_hidden, teacher_head)
        grad_fn = self.variant(jax.grad(masked_loss("chunked"), argnums=(0, 1, 2, 3)))
        if tiled_head_gradient:
            with unittest.mock.patch.object(chunked, "HEAD_GRADIENT_TILE_BYTES",
                                            4 * D_STUDENT * 128):
                grads = grad_fn(*args)
        else:
            grads = grad_fn(*args)
        reference_grads = jax.grad(masked_loss("reference"), argnums=(0, 1, 2, 3))(*args)
        chex.assert_trees_all_close(grads, reference_grads, rtol=RTOL, atol=ATOL)
        # Gradients reach the student only; masked positions get none.
        assert float(jnp.abs(grads[1]).max()) > 0.0
        np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[3]), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0])[mask == 0], 0.0)


def test_student_gradient_matches_finite_differences():
    """Independent of autodiff: a central difference of the summed top-k JSD along a random
    direction of the student head (float64 NumPy)."""
    student_hidden, student_head, teacher_hidden, teacher_head, _ = make_inputs(seed=3)
    direction = np.random.default_rng(0).normal(size=student_head.shape)
    grad = jax.grad(lambda w: jnp.sum(token_divergence(
        student_hidden, w, teacher_hidden, teacher_head, "jsd", beta=BETA, top_k=TOP_K,
        temperature=TEMPERATURE, chunk_size=16, implementation="chunked")))(student_head)
    eps = 1e-4
    plus = numpy_divergence(student_hidden, student_head + eps * direction, teacher_hidden,
                            teacher_head, "jsd", top_k=TOP_K).sum()
    minus = numpy_divergence(student_hidden, student_head - eps * direction, teacher_hidden,
                             teacher_head, "jsd", top_k=TOP_K).sum()
    np.testing.assert_allclose(float(jnp.sum(grad * direction)), (plus - minus) / (2 * eps),
                               rtol=1e-4)


def test_identical_models_have_zero_divergence_and_cross_entropy_is_the_entropy():
    student_hidden, student_head, _, _, _ = make_inputs(seed=4)
    same = (student_hidden, student_head, student_hidden, student_head)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        divergence = token_divergence(*same, kind, temperature=TEMPERATURE, chunk_size=16,
                                      implementation="chunked")
        chex.assert_trees_all_close(divergence, np.zeros((B, T)), atol=1e-5)
    cross_entropy = token_divergence(*same, "forward_ce", temperature=TEMPERATURE,
                                     chunk_size=16, implementation="chunked")
    _, entropy = token_logprobs(student_hidden, student_head, np.zeros((B, T), np.int32),
                                TEMPERATURE, return_entropy=True, implementation="chunked")
    chex.assert_trees_all_close(cross_entropy, entropy, rtol=RTOL, atol=ATOL)


def test_top_k_with_an_underflowing_tail_stays_finite():
    """A near one-hot teacher leaves a tail whose mass underflows float32: no NaN or inf."""
    student_hidden, student_head, teacher_hidden, teacher_head, _ = make_inputs(seed=5)
    for kind in ("forward_kl", "jsd"):
        value, grads = jax.value_and_grad(lambda sh, sw: jnp.sum(token_divergence(
            sh, sw, teacher_hidden, 1000.0 * teacher_head, kind, top_k=TOP_K,
            chunk_size=16, implementation="chunked")), argnums=(0, 1))(student_hidden,
                                                                       student_head)
        assert np.isfinite(float(value)), kind
        assert all(bool(jnp.isfinite(g).all()) for g in grads), kind


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="kl"), "unknown divergence kind"),
    (dict(kind="jsd", beta=1.5), "beta must be in"),
    (dict(kind="forward_kl", top_k=V), "top_k must be in"),
    (dict(kind="forward_kl", implementation="fast"), "unknown implementation"),
])
def test_invalid_arguments_raise(kwargs, match):
    inputs = make_inputs()[:4]
    with pytest.raises(ValueError, match=match):
        token_divergence(*inputs, **kwargs)


def test_mismatched_vocabularies_raise():
    student_hidden, student_head, teacher_hidden, teacher_head, _ = make_inputs()
    with pytest.raises(ValueError, match="tokenizers must match"):
        token_divergence(student_hidden, student_head, teacher_hidden, teacher_head[:, :-1],
                         "forward_kl")


def test_chunked_divergence_gradient_never_holds_the_logits():
    """Compile only: N = 2048, V = 8192 -> 64 MiB per model's float32 logits."""
    n_tokens, vocab = 2048, 8192
    materialized = n_tokens * vocab * 4
    shapes = (jax.ShapeDtypeStruct((4, n_tokens // 4, 64), jnp.float32),
              jax.ShapeDtypeStruct((64, vocab), jnp.float32),
              jax.ShapeDtypeStruct((4, n_tokens // 4, 32), jnp.float32),
              jax.ShapeDtypeStruct((32, vocab), jnp.float32))

    def temp_bytes(kind, top_k, implementation):
        grad = jax.grad(lambda sh, sw, th, tw: jnp.sum(token_divergence(
            sh, sw, th, tw, kind, top_k=top_k, chunk_size=64, implementation=implementation)),
            argnums=(0, 1))
        return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    for kind, top_k in (("jsd", 0), ("forward_kl", 16)):
        reference_temp = temp_bytes(kind, top_k, "reference")
        chunked_temp = temp_bytes(kind, top_k, "chunked")
        assert reference_temp >= materialized
        assert chunked_temp < materialized / 4 and chunked_temp < reference_temp / 8


def test_inside_shard_map_over_the_batch_matches_the_reference():
    """Data parallel use: both hidden states sharded over 8 devices, heads replicated; the
    student head's gradient is summed over the shards."""
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(6)
    student_hidden = rng.normal(size=(8, 5, D_STUDENT)).astype(np.float32)
    teacher_hidden = rng.normal(size=(8, 5, D_TEACHER)).astype(np.float32)
    _, student_head, _, teacher_head, _ = make_inputs(seed=6)
    jsd = functools.partial(token_divergence, kind="jsd", top_k=TOP_K)
    expected = jax.value_and_grad(
        lambda sh, sw: jnp.sum(jsd(sh, sw, teacher_hidden, teacher_head,
                                   implementation="reference")),
        argnums=(0, 1))(student_hidden, student_head)
    with jax.set_mesh(mesh):
        local = jax.shard_map(
            functools.partial(jsd, chunk_size=4, implementation="chunked"),
            in_specs=(P("data"), P(), P("data"), P()), out_specs=P("data"))
        sharded_teacher_hidden = jax.device_put(teacher_hidden, P("data"))
        value_and_grad = jax.jit(jax.value_and_grad(
            lambda sh, sw: jnp.sum(local(sh, sw, sharded_teacher_hidden, teacher_head)),
            argnums=(0, 1)))
        result = jax.device_get(value_and_grad(jax.device_put(student_hidden, P("data")),
                                               jax.device_put(student_head, P())))
    chex.assert_trees_all_close(result, expected, rtol=RTOL, atol=ATOL)
