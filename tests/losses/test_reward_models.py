"""Implicit PRM cross-entropy and MSE reward losses against NumPy references."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from bridge.losses import implicit_prm_ce_loss, implicit_token_rewards, mse_reward_loss


def make_inputs(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    logp = (-rng.random((5, 6)) * 3 * scale).astype(np.float32)
    ref = (-rng.random((5, 6)) * 3 * scale).astype(np.float32)
    mask = rng.random((5, 6)) < 0.7
    mask[2] = False
    labels = np.array([1, 0, 1, 0, 1], np.float32)
    return logp, ref, mask, labels


def np_z(logp, ref, mask, beta):
    return beta * ((np.float64(logp) - ref) * mask).sum(-1)


class RewardModelTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_implicit_prm_ce_loss(self):
        for seed, scale, beta in ((0, 1.0, 0.05), (1, 300.0, 1.0)):  # second: |z| ~ 1e3
            logp, ref, mask, labels = make_inputs(seed, scale)
            loss, metrics = self.variant(lambda *a, beta=beta: implicit_prm_ce_loss(*a, beta=beta))(
                logp, ref, mask, labels
            )
            z = np_z(logp, ref, mask, beta)
            want = np.mean(np.logaddexp(0.0, z) - labels * z)
            np.testing.assert_allclose(loss, want, rtol=1e-5)
            np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
            np.testing.assert_allclose(metrics["accuracy"], np.mean((z > 0) == (labels > 0.5)))
            np.testing.assert_allclose(metrics["reward_mean"], z.mean(), rtol=1e-5, atol=1e-6)
            assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())

    @chex.variants(with_jit=True, without_jit=True)
    def test_implicit_prm_ce_loss_returns_token_rewards(self):
        for seed, scale, beta in ((6, 1.0, 0.05), (7, 300.0, 1.0)):
            logp, ref, mask, labels = make_inputs(seed, scale)
            loss, metrics, rewards = self.variant(
                lambda *a, beta=beta: implicit_prm_ce_loss(*a, beta=beta, return_token_rewards=True)
            )(logp, ref, mask, labels)
            want_rewards = beta * (np.float64(logp) - ref) * mask
            chex.assert_shape(rewards, logp.shape)
            np.testing.assert_allclose(rewards, want_rewards, rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(np.asarray(rewards)[~mask], 0.0)
            z = want_rewards.sum(-1)
            np.testing.assert_allclose(loss, np.mean(np.logaddexp(0.0, z) - labels * z), rtol=1e-5)
            np.testing.assert_allclose(metrics["reward_mean"], z.mean(), rtol=1e-5, atol=1e-6)
            assert set(metrics) == {"loss", "accuracy", "reward_mean"}

    def test_token_rewards_are_differentiable(self):
        """d(sum_t w_t r_t)/d logp = beta * w * m: the dense rewards carry the policy gradient."""
        logp, ref, mask, labels = make_inputs(8)
        weights = np.random.default_rng(8).normal(size=logp.shape).astype(np.float32)
        grad = jax.grad(
            lambda lp: jnp.sum(weights * implicit_prm_ce_loss(lp, ref, mask, labels, beta=0.3,
                                                              return_token_rewards=True)[2])
        )(logp)
        np.testing.assert_allclose(grad, 0.3 * weights * mask, rtol=1e-5, atol=1e-7)

    def test_implicit_token_rewards(self):
        logp, ref, mask, _ = make_inputs(2)
        got = implicit_token_rewards(logp, ref, mask, beta=0.1)
        np.testing.assert_allclose(got, 0.1 * (np.float64(logp) - ref) * mask, rtol=1e-5, atol=1e-7)

    def test_prm_gradient_matches_analytic(self):
        logp, ref, mask, labels = make_inputs(3)
        grad = jax.grad(lambda lp: implicit_prm_ce_loss(lp, ref, mask, labels, beta=0.5)[0])(logp)
        z = np_z(logp, ref, mask, 0.5)
        want = ((1 / (1 + np.exp(-z)) - labels) * 0.5 / len(z))[:, None] * mask
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mse_reward_loss(self):
        logp, ref, mask, _ = make_inputs(4)
        rewards = np.array([0.5, -1.0, 2.0, 0.0, 1.0], np.float32)
        loss, metrics = self.variant(lambda *a: mse_reward_loss(*a, beta=0.2))(logp, ref, mask, rewards)
        z = np_z(logp, ref, mask, 0.2)
        np.testing.assert_allclose(loss, np.mean((z - rewards) ** 2), rtol=1e-5)
        np.testing.assert_allclose(metrics["reward_mean"], z.mean(), rtol=1e-5)

    def test_padding_and_empty_rows_stay_finite(self):
        logp, ref, mask, labels = make_inputs(5)
        logp = np.where(mask, logp, -np.inf).astype(np.float32)
        for fn in (
            lambda lp: implicit_prm_ce_loss(lp, ref, mask, labels)[0],
            lambda lp: mse_reward_loss(lp, ref, mask, labels, beta=0.1)[0],
        ):
            value, grad = jax.value_and_grad(fn)(logp)
            assert np.isfinite(value)
            assert np.all(np.isfinite(grad))
            np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
