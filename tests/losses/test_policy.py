"""Policy surrogates against NumPy references; gradients where stop-gradients matter."""
import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import losses
from bridge.losses import AGGREGATIONS, cispo_loss, clipped_surrogate, gspo_loss, sapo_loss

B, T = 4, 6


# ---------------------------------------------------------------- NumPy references
def np_reduce(per_token, mask, mode, max_len=None):
    m = np.asarray(mask, np.float64)
    vm = np.where(m != 0, per_token * m, 0.0)
    if mode == "token-mean":
        return vm.sum() / m.sum() if m.sum() else 0.0
    rows = [r for r in range(m.shape[0]) if (m[r] != 0).any()]  # rows with no mask do not count
    if not rows:
        return 0.0
    if mode == "seq-mean-token-mean":
        return np.mean([vm[r].sum() / m[r].sum() for r in rows])
    if mode == "seq-mean-token-sum":
        return np.mean([vm[r].sum() for r in rows])
    return vm.sum() / (len(rows) * (max_len or vm.shape[1]))


def np_token_mean(x, mask):
    m = np.asarray(mask, np.float64)
    return (np.asarray(x, np.float64) * m).sum() / m.sum()


def adv_2d(adv):
    adv = np.asarray(adv, np.float64)
    return np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (B, T))


def np_ppo(logp, old, adv, mask, lo, hi, dual=None):
    rho = np.exp(np.float64(logp) - old)
    a = adv_2d(adv)
    per = np.maximum(-a * rho, -a * np.clip(rho, 1 - lo, 1 + hi))
    if dual is not None:
        per = np.where(a < 0, np.minimum(per, -dual * a), per)
    return per, rho, a


def np_gspo(logp, old, adv, mask, lo, hi):
    m = np.asarray(mask, np.float64)
    d = (np.float64(logp) - old) * m
    n = m.sum(-1)
    s = np.exp(np.array([row.sum() / k if k else 0.0 for row, k in zip(d, n)]))[:, None]
    s = np.broadcast_to(s, (B, T))
    a = adv_2d(adv)
    return np.maximum(-a * s, -a * np.clip(s, 1 - lo, 1 + hi)), s, a


def np_sapo(logp, old, adv, mask, tau_pos, tau_neg):
    rho = np.exp(np.float64(logp) - old)
    a = adv_2d(adv)
    tau = np.where(a > 0, tau_pos, tau_neg)
    return -(4.0 / tau) / (1.0 + np.exp(-tau * (rho - 1.0))) * a


def np_cispo(logp, old, adv, mask, hi):
    rho = np.exp(np.float64(logp) - old)
    return -np.minimum(rho, 1 + hi) * adv_2d(adv) * logp


def make_inputs(seed=0, per_token_adv=False, extreme=False):
    rng = np.random.default_rng(seed)
    logp = (-rng.random((B, T)) * 3.0).astype(np.float32)
    delta = rng.normal(scale=0.3, size=(B, T))
    if extreme:  # rho = 1e-6 and 1e6
        delta[0, :3] = np.log(1e-6)
        delta[0, 3:] = np.log(1e6)
        delta[3, ::2] = np.log(1e6)
        delta[3, 1::2] = np.log(1e-6)
    old = (logp - delta).astype(np.float32)
    adv = rng.normal(size=(B, T) if per_token_adv else (B,)).astype(np.float32)
    mask = rng.random((B, T)) < 0.7
    mask[1] = False
    mask[0] = True
    mask[3] = True
    return logp, old, adv, mask


CASES = [
    dict(seed=0),
    dict(seed=1, per_token_adv=True),
    dict(seed=2, extreme=True),
    dict(seed=3, per_token_adv=True, extreme=True),
]


# ---------------------------------------------------------------- values
class ValuesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_clipped_surrogate(self):
        for case in CASES:
            logp, old, adv, mask = make_inputs(**case)
            for mode in AGGREGATIONS:
                for dual in (None, 3.0):
                    fn = self.variant(
                        lambda *a, mode=mode, dual=dual: clipped_surrogate(
                            *a, clip_low=0.2, clip_high=0.28, dual_clip=dual, aggregation=mode, max_len=8
                        )
                    )
                    loss, metrics = fn(logp, old, adv, mask)
                    per, rho, a = np_ppo(logp, old, adv, mask, 0.2, 0.28, dual)
                    want = np_reduce(per, mask, mode, 8)
                    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
                    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5, atol=1e-6)
                    np.testing.assert_allclose(
                        metrics["clip_frac_low"], np_token_mean((rho < 0.8) & (a < 0), mask), rtol=1e-6
                    )
                    np.testing.assert_allclose(
                        metrics["clip_frac_high"], np_token_mean((rho > 1.28) & (a > 0), mask), rtol=1e-6
                    )
                    np.testing.assert_allclose(metrics["ratio_mean"], np_token_mean(rho, mask), rtol=1e-5)
                    np.testing.assert_allclose(
                        metrics["approx_kl"], np_token_mean(rho - 1 - np.log(rho), mask), rtol=1e-5
                    )
                    if dual is not None:
                        bound = -dual * a
                        base = np_ppo(logp, old, adv, mask, 0.2, 0.28)[0]
                        np.testing.assert_allclose(
                            metrics["dual_clip_frac"], np_token_mean((a < 0) & (base > bound), mask), rtol=1e-6
                        )
                    for value in metrics.values():
                        self.assertEqual(value.dtype, jnp.float32)
                        self.assertEqual(value.shape, ())

    @chex.variants(with_jit=True, without_jit=True)
    def test_gspo(self):
        for case in CASES:
            logp, old, adv, mask = make_inputs(**case)
            for mode in AGGREGATIONS:
                fn = self.variant(lambda *a, mode=mode: gspo_loss(*a, clip_low=0.1, clip_high=0.2, aggregation=mode))
                loss, metrics = fn(logp, old, adv, mask)
                per, s, a = np_gspo(logp, old, adv, mask, 0.1, 0.2)
                np.testing.assert_allclose(loss, np_reduce(per, mask, mode), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(
                    metrics["clip_frac_high"], np_token_mean((s > 1.2) & (a > 0), mask), rtol=1e-6
                )
                np.testing.assert_allclose(
                    metrics["clip_frac_low"], np_token_mean((s < 0.9) & (a < 0), mask), rtol=1e-6
                )

    def test_gspo_default_is_sequence_mean(self):
        logp, old, adv, mask = make_inputs(4)
        per, _, _ = np_gspo(logp, old, adv, mask, 3e-4, 4e-4)
        np.testing.assert_allclose(
            gspo_loss(logp, old, adv, mask)[0], np_reduce(per, mask, "seq-mean-token-mean"), rtol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_sapo(self):
        for case in CASES:
            logp, old, adv, mask = make_inputs(**case)
            for mode in AGGREGATIONS:
                fn = self.variant(lambda *a, mode=mode: sapo_loss(*a, tau_pos=1.0, tau_neg=1.05, aggregation=mode))
                loss, metrics = fn(logp, old, adv, mask)
                per = np_sapo(logp, old, adv, mask, 1.0, 1.05)
                np.testing.assert_allclose(loss, np_reduce(per, mask, mode), rtol=1e-5, atol=1e-6)
                rho = np.exp(np.float64(logp) - old)
                tau = np.where(adv_2d(adv) > 0, 1.0, 1.05)
                sig = 1 / (1 + np.exp(-tau * (rho - 1)))
                np.testing.assert_allclose(metrics["gate_mean"], np_token_mean(4 * sig * (1 - sig), mask), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cispo(self):
        for case in CASES:
            logp, old, adv, mask = make_inputs(**case)
            for mode in AGGREGATIONS:
                fn = self.variant(lambda *a, mode=mode: cispo_loss(*a, clip_high=0.5, aggregation=mode))
                loss, metrics = fn(logp, old, adv, mask)
                per = np_cispo(logp, old, adv, mask, 0.5)
                np.testing.assert_allclose(loss, np_reduce(per, mask, mode), rtol=1e-5, atol=1e-6)
                rho = np.exp(np.float64(logp) - old)
                np.testing.assert_allclose(metrics["clip_frac_high"], np_token_mean(rho > 1.5, mask), rtol=1e-6)


# ---------------------------------------------------------------- gradients
ALL_LOSSES = {
    "ppo": lambda *a, **k: clipped_surrogate(*a, dual_clip=3.0, **k),
    "gspo": gspo_loss,
    "sapo": sapo_loss,
    "cispo": lambda *a, **k: cispo_loss(*a, clip_high=1.0, **k),
}


def test_gspo_token_gradient_matches_analytic():
    for per_token_adv in (False, True):
        logp, old, adv, mask = make_inputs(5, per_token_adv=per_token_adv)
        lo, hi = 0.05, 0.05
        grad = jax.grad(lambda lp: gspo_loss(lp, old, adv, mask, clip_low=lo, clip_high=hi)[0])(logp)
        _, s, a = np_gspo(logp, old, adv, mask, lo, hi)
        m = mask.astype(np.float64)
        n = np.maximum(m.sum(-1, keepdims=True), 1)
        clipped = ((s > 1 + hi) & (a > 0)) | ((s < 1 - lo) & (a < 0))
        rows = (m.sum(-1) > 0).sum()  # sequence means count only rows with completion tokens
        want = np.where(clipped, 0.0, -s * a) * m / n / rows
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_gspo_token_equals_sequence_level_gspo_gradient():
    """With per-sequence advantages the token form has the sequence-level gradient."""
    logp, old, adv, mask = make_inputs(6)

    def sequence_gspo(lp):
        m = mask.astype(jnp.float32)
        s = jnp.exp(jnp.sum((lp - old) * m, -1) / jnp.maximum(m.sum(-1), 1))
        counted = (m.sum(-1) > 0).astype(jnp.float32)  # an empty row is not a sequence
        per_row = jnp.minimum(s * adv, jnp.clip(s, 1 - 0.3, 1 + 0.3) * adv)
        return -jnp.sum(per_row * counted) / jnp.sum(counted)

    token_grad = jax.grad(lambda lp: gspo_loss(lp, old, adv, mask, clip_low=0.3, clip_high=0.3)[0])(logp)
    np.testing.assert_allclose(token_grad, jax.grad(sequence_gspo)(logp), rtol=1e-5, atol=1e-7)


def test_cispo_gradient_matches_analytic():
    for case in CASES:
        logp, old, adv, mask = make_inputs(**case)
        grad = jax.grad(lambda lp: cispo_loss(lp, old, adv, mask, clip_high=0.5)[0])(logp)
        rho = np.exp(np.float64(logp) - old)
        m = mask.astype(np.float64)
        want = -np.minimum(rho, 1.5) * adv_2d(adv) * m / m.sum()
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_clipped_surrogate_gradient_matches_analytic():
    logp, old, adv, mask = make_inputs(7, per_token_adv=True, extreme=True)
    grad = jax.grad(lambda lp: clipped_surrogate(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)[0])(logp)
    rho = np.exp(np.float64(logp) - old)
    m = mask.astype(np.float64)
    active = ~(((rho > 1.2) & (adv > 0)) | ((rho < 0.8) & (adv < 0)))
    want = np.where(active, -adv * rho, 0.0) * m / m.sum()
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_advantages_are_constants():
    logp, old, adv, mask = make_inputs(8, per_token_adv=True)
    for name, fn in ALL_LOSSES.items():
        grad = jax.grad(lambda a, fn=fn: fn(logp, old, a, mask)[0])(adv)
        np.testing.assert_array_equal(grad, 0.0, err_msg=name)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_empty_rows_and_padding_never_nan(name, mode):
    logp, old, adv, mask = make_inputs(9, extreme=True)
    logp = np.where(mask, logp, -np.inf).astype(np.float32)  # padding may hold anything
    old = np.where(mask, old, np.nan).astype(np.float32)
    fn = ALL_LOSSES[name]
    (loss, metrics), grad = jax.value_and_grad(lambda lp: fn(lp, old, adv, mask, aggregation=mode), has_aux=True)(logp)
    assert np.isfinite(loss)
    assert all(np.isfinite(v) for v in metrics.values())
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)

    empty = np.zeros_like(mask)
    (loss, metrics), grad = jax.value_and_grad(lambda lp: fn(lp, old, adv, empty, aggregation=mode), has_aux=True)(logp)
    assert float(loss) == 0.0
    assert all(float(v) == 0.0 for v in metrics.values())
    np.testing.assert_array_equal(grad, 0.0)


# ---------------------------------------------------------------- properties
@settings(max_examples=30, deadline=None)
@given(
    logp=hnp.arrays(np.float32, (B, T), elements=st.floats(-20, 0, width=32)),
    adv=hnp.arrays(np.float32, (B,), elements=st.floats(-5, 5, width=32)),
    mask=hnp.arrays(np.bool_, (B, T)).filter(lambda m: m.any()),
)
def test_unit_ratio_gives_minus_mean_advantage(logp, adv, mask):
    loss, metrics = clipped_surrogate(logp, logp, adv, mask)
    want = -np_token_mean(np.broadcast_to(adv[:, None], (B, T)), mask)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert float(metrics["clip_frac_low"]) == float(metrics["clip_frac_high"]) == 0.0
    np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-6)


def test_registry():
    logp, old, adv, mask = make_inputs(10)
    fn = losses.policy_loss("grpo", clip_high=0.28)
    chex.assert_trees_all_close(fn(logp, old, adv, mask), clipped_surrogate(logp, old, adv, mask, clip_high=0.28))
    assert losses.policy_loss("ppo").func is clipped_surrogate
    assert losses.policy_loss("gspo").func is gspo_loss
    assert losses.policy_loss("sapo").func is sapo_loss
    assert losses.policy_loss("cispo", clip_high=4.0).keywords == {"clip_high": 4.0}
    with pytest.raises(ValueError, match="cispo"):
        losses.policy_loss("reinforce")


def test_dual_clip_must_exceed_one():
    logp, old, adv, mask = make_inputs(11)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(logp, old, adv, mask, dual_clip=0.5)
