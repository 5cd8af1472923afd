"""Advantages and dense rewards against NumPy references."""
import chex
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import advantages as adv


def np_group(rewards, g, scale, eps=1e-6):
    out = []
    for group in np.asarray(rewards, np.float64).reshape(-1, g):
        centered = group - group.mean()
        if scale == "std":
            centered = centered / (group.std(ddof=1) + eps)
        out.append(np.zeros(g) if np.all(group == group[0]) else centered)
    return np.concatenate(out)


def np_rloo(rewards, g):
    out = []
    for group in np.asarray(rewards, np.float64).reshape(-1, g):
        out.extend(r - np.delete(group, i).mean() for i, r in enumerate(group))
    return np.array(out)


def np_whiten(values, mask, eps=1e-8):
    v = np.asarray(values, np.float64)
    m = np.asarray(mask, bool)
    selected = v[m]
    var = selected.var(ddof=1) if selected.size > 1 else 0.0
    return np.where(m, (v - selected.mean()) / np.sqrt(var + eps), 0.0) if selected.size else np.zeros_like(v)


def make_tokens(seed=0):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(4, 5)).astype(np.float32) * 3 + 1
    mask = rng.random((4, 5)) < 0.7
    mask[2] = False
    return values, mask


class SequenceAdvantagesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_group_advantages(self):
        rewards = np.array([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 3, -1, 2, 0.25], np.float32)
        for scale in ("std", "none"):
            got = self.variant(lambda r, scale=scale: adv.group_advantages(r, 4, scale=scale))(rewards)
            np.testing.assert_allclose(got, np_group(rewards, 4, scale), rtol=1e-5, atol=1e-7)

    def test_equal_groups_give_exact_zero(self):
        rewards = jnp.array([0.1, 0.1, 0.1, 7.3, 7.3, 7.3], jnp.float32)
        for scale in ("std", "none"):
            np.testing.assert_array_equal(adv.group_advantages(rewards, 3, scale=scale), 0.0)
        np.testing.assert_array_equal(adv.group_advantages(rewards, 1), 0.0)

    def test_integer_rewards(self):
        got = adv.group_advantages(np.array([1, 0, 1, 1]), 2)
        np.testing.assert_allclose(got, np_group([1, 0, 1, 1], 2, "std"), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rloo(self):
        rewards = np.random.default_rng(0).normal(size=12).astype(np.float32)
        for g in (2, 3, 6):
            got = self.variant(lambda r, g=g: adv.rloo_advantages(r, g))(rewards)
            np.testing.assert_allclose(got, np_rloo(rewards, g), rtol=1e-5, atol=1e-6)

    def test_registry(self):
        rewards = np.array([1, 0, 0, 0, 1, 1, 0, 1], np.float32)
        np.testing.assert_allclose(adv.advantage_estimator("grpo")(rewards, 4), np_group(rewards, 4, "std"), rtol=1e-5)
        np.testing.assert_allclose(adv.advantage_estimator("drgrpo")(rewards, 4), np_group(rewards, 4, "none"), rtol=1e-5)
        np.testing.assert_allclose(adv.advantage_estimator("rloo")(rewards, 4), np_rloo(rewards, 4), rtol=1e-5, atol=1e-7)
        with pytest.raises(ValueError, match="rloo"):
            adv.advantage_estimator("ppo")

    def test_validation(self):
        with pytest.raises(ValueError, match="group_size"):
            adv.group_advantages(jnp.ones(5), 2)
        with pytest.raises(ValueError, match="std"):
            adv.group_advantages(jnp.ones(4), 2, scale="mad")
        with pytest.raises(ValueError, match="group_size >= 2"):
            adv.rloo_advantages(jnp.ones(4), 1)


class TokenAdvantagesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_whiten(self):
        values, mask = make_tokens()
        for m in (mask, mask.astype(np.float32)):
            got = self.variant(adv.whiten)(values, m)
            np.testing.assert_allclose(got, np_whiten(values, mask), rtol=1e-5, atol=1e-6)

    def test_whiten_degenerate_masks(self):
        values, _ = make_tokens(1)
        np.testing.assert_array_equal(adv.whiten(values, np.zeros((4, 5), bool)), 0.0)
        single = np.zeros((4, 5), bool)
        single[1, 3] = True
        np.testing.assert_array_equal(adv.whiten(values, single), 0.0)
        const = np.ones((4, 5), np.float32)
        np.testing.assert_array_equal(adv.whiten(const, np.ones((4, 5), bool)), 0.0)

    def test_opd_and_exopd(self):
        rng = np.random.default_rng(2)
        s, t, b = (-rng.random((3, 4)).astype(np.float32) * 5 for _ in range(3))
        np.testing.assert_allclose(adv.opd_token_advantages(s, t, coef=0.5), -0.5 * (np.float64(s) - t), rtol=1e-5)
        want = 1.25 * (np.float64(t) - b) - (np.float64(s) - b)
        np.testing.assert_allclose(adv.exopd_token_advantages(s, t, b), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            adv.exopd_token_advantages(s, t, b, lam=1.0), adv.opd_token_advantages(s, t), rtol=1e-5, atol=1e-6
        )

    def test_erpd_rewards(self):
        pos, mask = make_tokens(3)
        neg, _ = make_tokens(4)
        np.testing.assert_allclose(
            adv.erpd_rewards(pos, neg, mask), np_whiten(np.float64(pos) - neg, mask), rtol=1e-5, atol=1e-6
        )

    def test_ensemble_rewards(self):
        (a, mask), (b, _) = make_tokens(5), make_tokens(6)
        want = (1.0 * np_whiten(a, mask) + 3.0 * np_whiten(b, mask)) / 4.0
        np.testing.assert_allclose(adv.ensemble_rewards([a, b], [1.0, 3.0], mask=mask), want, rtol=1e-5, atol=1e-6)
        uniform = (np_whiten(a, np.ones_like(mask)) + np_whiten(b, np.ones_like(mask))) / 2
        np.testing.assert_allclose(adv.ensemble_rewards([a, b]), uniform, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="weights"):
            adv.ensemble_rewards([a, b], [1.0])


def np_tip(entropy, divergence, mask, alpha, gamma, keep_fraction):
    m = np.asarray(mask, bool)
    h = np.asarray(entropy, np.float64)
    d = np.maximum(np.asarray(divergence, np.float64), 0)
    score = (h / h[m].mean()) ** alpha * (d / d[m].mean()) ** gamma
    n = int(m.sum())
    keep = max(int(np.floor(keep_fraction * n + 0.5)), 1)
    candidates = sorted((-score.flat[i], i) for i in np.flatnonzero(m.ravel()))
    out = np.zeros(h.size)
    out[[i for _, i in candidates[:keep]]] = 1.0
    return out.reshape(h.shape)


@pytest.mark.parametrize("alpha,gamma,keep", [(1.0, 1.0, 0.5), (2.0, 0.0, 0.3), (0.5, 1.5, 1.0), (1.0, 1.0, 0.01)])
def test_tip_token_weights(alpha, gamma, keep):
    rng = np.random.default_rng(7)
    entropy = rng.random((4, 6)).astype(np.float32) * 3
    divergence = rng.normal(size=(4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.8
    mask[0] = False
    got = adv.tip_token_weights(entropy, divergence, mask, alpha=alpha, gamma=gamma, keep_fraction=keep)
    np.testing.assert_array_equal(got, np_tip(entropy, divergence, mask, alpha, gamma, keep))


def test_tip_token_weights_empty_mask_and_validation():
    zeros = np.zeros((2, 3), bool)
    np.testing.assert_array_equal(adv.tip_token_weights(np.ones((2, 3)), np.ones((2, 3)), zeros), 0.0)
    with pytest.raises(ValueError, match="keep_fraction"):
        adv.tip_token_weights(np.ones((2, 3)), np.ones((2, 3)), ~zeros, keep_fraction=0.0)
