"""KL estimators k1/k2/k3 against NumPy, including extreme log-ratios; properties."""
import chex
import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.losses import aggregate, kl_estimate


def np_kl(logp, ref, kind):
    d = np.float64(logp) - np.float64(ref)
    return {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) + d - 1.0}[kind]


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    logp = (-rng.random((3, 7)) * 4).astype(np.float32)
    ref = (logp + rng.normal(scale=0.5, size=(3, 7))).astype(np.float32)
    ref[0, :3] = logp[0, :3] + np.log(1e6)  # ref/pi = 1e6
    ref[0, 3:6] = logp[0, 3:6] + np.log(1e-6)  # ref/pi = 1e-6
    return logp, ref


class KLTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        logp, ref = make_inputs()
        for kind in ("k1", "k2", "k3"):
            got = self.variant(lambda a, b, kind=kind: kl_estimate(a, b, kind))(logp, ref)
            np.testing.assert_allclose(got, np_kl(logp, ref, kind), rtol=1e-5, atol=1e-6)

    def test_k3_gradient_matches_analytic(self):
        logp, ref = make_inputs(1)
        grad = jax.grad(lambda lp: kl_estimate(lp, ref, "k3").sum())(logp)
        np.testing.assert_allclose(grad, 1.0 - np.exp(np.float64(ref) - logp), rtol=1e-5, atol=1e-6)

    def test_usable_as_aggregated_loss_term(self):
        logp, ref = make_inputs(2)
        mask = np.array([[1, 1, 0, 0, 0, 0, 0], [0] * 7, [1] * 7], bool)
        got = aggregate(kl_estimate(logp, ref, "k3"), mask, "token-mean")
        np.testing.assert_allclose(got, np_kl(logp, ref, "k3")[mask].mean(), rtol=1e-5)

    def test_unknown_kind_names_the_choices(self):
        with pytest.raises(ValueError, match="k3"):
            kl_estimate(np.zeros(2), np.zeros(2), "k4")


@settings(max_examples=40, deadline=None)
@given(
    logp=hnp.arrays(np.float32, (8,), elements=st.floats(-15, 0, width=32)),
    ref=hnp.arrays(np.float32, (8,), elements=st.floats(-15, 0, width=32)),
)
def test_k2_k3_nonnegative_and_zero_on_match(logp, ref):
    for kind in ("k2", "k3"):
        assert np.all(np.asarray(kl_estimate(logp, ref, kind)) >= 0.0)
        np.testing.assert_array_equal(kl_estimate(logp, logp, kind), 0.0)
