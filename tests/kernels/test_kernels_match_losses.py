"""The large-V streaming kernels (`bridge.kernels.logprobs`) agree with the small-V objectives
(`bridge.losses`) applied to the materialized logits hidden @ head: values and gradients
with respect to the student's hidden states and head, for both implementations, on odd
shapes with masked positions. Both sides run in float32; tolerance rtol 1e-5."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import losses
from bridge.kernels.logprobs import token_divergence, token_logprobs

# Odd shapes: N = B * T = 21 rows is not a multiple of the chunk (4); V = 37 is prime.
B, T, V = 3, 7, 37
D_STUDENT, D_TEACHER = 5, 6
CHUNK = 4
TOP_K = 4
TEMPERATURE = 0.8
RTOL, ATOL = 1e-5, 1e-6
IMPLEMENTATIONS = {"reference": dict(implementation="reference"),
                   "chunked": dict(implementation="chunked", chunk_size=CHUNK)}

# name: (kernel kind, kernel keyword arguments, bridge.losses function on logits)
DIVERGENCES = {
    "forward_kl": ("forward_kl", {}, losses.forward_kl),
    "reverse_kl": ("reverse_kl", {}, losses.reverse_kl),
    "jsd_beta0": ("jsd", dict(beta=0.0), functools.partial(losses.generalized_jsd, beta=0.0)),
    "jsd_beta0.3": ("jsd", dict(beta=0.3), functools.partial(losses.generalized_jsd, beta=0.3)),
    "jsd_beta1": ("jsd", dict(beta=1.0), functools.partial(losses.generalized_jsd, beta=1.0)),
    "forward_ce": ("forward_ce", {}, losses.forward_cross_entropy),
    "topk_forward_kl": ("forward_kl", dict(top_k=TOP_K),
                        functools.partial(losses.topk_forward_kl, k=TOP_K)),
    "topk_reverse_kl": ("reverse_kl", dict(top_k=TOP_K),
                        functools.partial(losses.topk_reverse_kl, k=TOP_K)),
    "topk_jsd_beta0": ("jsd", dict(top_k=TOP_K, beta=0.0),
                       functools.partial(losses.topk_generalized_jsd, k=TOP_K, beta=0.0)),
    "topk_jsd_beta0.7": ("jsd", dict(top_k=TOP_K, beta=0.7),
                         functools.partial(losses.topk_generalized_jsd, k=TOP_K, beta=0.7)),
    "topk_jsd_beta1": ("jsd", dict(top_k=TOP_K, beta=1.0),
                       functools.partial(losses.topk_generalized_jsd, k=TOP_K, beta=1.0)),
}


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    student_hidden = rng.normal(size=(B, T, D_STUDENT)).astype(np.float32)
    student_head = rng.normal(size=(D_STUDENT, V)).astype(np.float32)
    teacher_hidden = rng.normal(size=(B, T, D_TEACHER)).astype(np.float32)
    teacher_head = (1.2 * rng.normal(size=(D_TEACHER, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
    mask[1] = 0.0  # a fully masked row
    return student_hidden, student_head, teacher_hidden, teacher_head, targets, mask


def masked_mean(values, mask):
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def assert_close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_token_divergence_matches_bridge_losses(name, implementation):
    kind, kernel_kwargs, bridge_fn = DIVERGENCES[name]
    student_hidden, student_head, teacher_hidden, teacher_head, _, mask = make_inputs(1)

    def kernel(sh, sw):
        per_position = token_divergence(sh, sw, teacher_hidden, teacher_head, kind,
                                        temperature=TEMPERATURE, **kernel_kwargs,
                                        **IMPLEMENTATIONS[implementation])
        return masked_mean(per_position, mask), per_position

    def bridge(sh, sw):
        per_position = bridge_fn(sh @ sw, teacher_hidden @ teacher_head, temperature=TEMPERATURE)
        return masked_mean(per_position, mask), per_position

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
    (got_loss, got_values), got_grads = grad(kernel)(student_hidden, student_head)
    (want_loss, want_values), want_grads = grad(bridge)(student_hidden, student_head)

    chex.assert_shape(got_values, (B, T))
    assert got_values.dtype == jnp.float32
    assert float(np.abs(want_values).max()) > 1e-2, "inputs too close to give a useful check"
    assert_close(got_values, want_values, f"{name}: per-position values")
    assert_close(got_loss, want_loss, f"{name}: masked loss")
    assert_close(got_grads[0], want_grads[0], f"{name}: d student_hidden")
    assert_close(got_grads[1], want_grads[1], f"{name}: d student_head")
    np.testing.assert_array_equal(np.asarray(got_grads[0])[mask == 0], 0.0)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_token_logprobs_and_entropy_match_log_softmax(implementation):
    """logp = log_softmax(h @ W / temperature)[target]; entropy = bridge.losses.entropy."""
    hidden, head, _, _, targets, mask = make_inputs(2)
    token_weights = np.random.default_rng(3).normal(size=(B, T)).astype(np.float32)

    def objective(logp, entropy):  # touches both outputs so both gradients are compared
        return jnp.sum(mask * token_weights * logp) + 0.3 * masked_mean(entropy, mask)

    def kernel(h, w):
        logp, entropy = token_logprobs(h, w, targets, TEMPERATURE, return_entropy=True,
                                       **IMPLEMENTATIONS[implementation])
        return objective(logp, entropy), (logp, entropy)

    def materialized(h, w):
        log_probs = jax.nn.log_softmax(h @ w / TEMPERATURE, axis=-1)
        logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        entropy = losses.entropy(h @ w, temperature=TEMPERATURE)
        return objective(logp, entropy), (logp, entropy)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
    (got_loss, (got_logp, got_entropy)), got_grads = grad(kernel)(hidden, head)
    (want_loss, (want_logp, want_entropy)), want_grads = grad(materialized)(hidden, head)

    chex.assert_shape((got_logp, got_entropy), (B, T))
    assert_close(got_logp, want_logp, "log-probabilities")
    assert_close(got_entropy, want_entropy, "entropy")
    assert_close(got_loss, want_loss, "objective")
    assert_close(got_grads[0], want_grads[0], "d hidden")
    assert_close(got_grads[1], want_grads[1], "d head")
    np.testing.assert_array_equal(np.asarray(got_grads[0])[mask == 0], 0.0)
