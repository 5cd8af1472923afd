"""Advantages and dense rewards against NumPy references."""
import chex
import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bridge import advantages as adv


def np_group(rewards, g, scale, eps=1e-6):
    out = []
    for group in np.asarray(rewards, np.float64).reshape(-1, g):
        if np.all(group == group[0]):
            out.append(np.zeros(g))
            continue
        centered = group - group.mean()
        out.append(centered / (group.std(ddof=1) + eps) if scale == "std" else centered)
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


@st.composite
def grouped_rewards(draw):
    """(rewards float32[n * g], g): discrete rewards (many constant groups) or continuous ones
    whose groups are either constant or spread by more than 1% of their magnitude (below that
    the f32 mean rounds to the size of the centered values and no f32 code can match f64)."""
    group_size, n_groups = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    shape = (n_groups * group_size,)
    if draw(st.booleans()):
        quarters = draw(hnp.arrays(np.int32, shape, elements=st.integers(-8, 8)))
        return (quarters / 4).astype(np.float32), group_size
    rewards = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)))
    for group in rewards.reshape(n_groups, group_size):
        spread = group.max() - group.min()
        assume(spread == 0 or spread > 1e-2 * (1 + np.abs(group).max()))
    return rewards, group_size


@settings(max_examples=60, deadline=None)
@given(case=grouped_rewards(), scale=st.sampled_from(("std", "none")))
def test_group_advantages_property(case, scale):
    rewards, group_size = case
    got = np.asarray(adv.group_advantages(rewards, group_size, scale=scale))
    want = np_group(rewards, group_size, scale)
    assert np.all(np.isfinite(got))
    atol = 1e-5 * (1.0 if scale == "std" else 1.0 + np.abs(rewards).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    for group, a in zip(rewards.reshape(-1, group_size), got.reshape(-1, group_size)):
        if np.all(group == group[0]):
            np.testing.assert_array_equal(a, 0.0)  # constant groups: exactly 0, never NaN
        else:
            np.testing.assert_allclose(a.sum(), 0.0, atol=atol * group_size)  # centered


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

    @chex.variants(with_jit=True, without_jit=True)
    def test_opd_and_exopd(self):
        rng = np.random.default_rng(2)
        s, t, b = (-rng.random((3, 4)).astype(np.float32) * 5 for _ in range(3))
        got = self.variant(lambda s, t: adv.opd_token_advantages(s, t, coef=0.5))(s, t)
        np.testing.assert_allclose(got, -0.5 * (np.float64(s) - t), rtol=1e-5)
        want = 1.25 * (np.float64(t) - b) - (np.float64(s) - b)
        np.testing.assert_allclose(self.variant(adv.exopd_token_advantages)(s, t, b), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            self.variant(lambda s, t, b: adv.exopd_token_advantages(s, t, b, lam=1.0))(s, t, b),
            -(np.float64(s) - t),
            rtol=1e-5,
            atol=1e-6,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_erpd_rewards(self):
        pos, mask = make_tokens(3)
        neg, _ = make_tokens(4)
        for m in (mask, mask.astype(np.float32)):
            np.testing.assert_allclose(
                self.variant(adv.erpd_rewards)(pos, neg, m), np_whiten(np.float64(pos) - neg, mask), rtol=1e-5, atol=1e-6
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_ensemble_rewards(self):
        (a, mask), (b, _) = make_tokens(5), make_tokens(6)
        want = (1.0 * np_whiten(a, mask) + 3.0 * np_whiten(b, mask)) / 4.0
        got = self.variant(lambda signals, m: adv.ensemble_rewards(signals, [1.0, 3.0], mask=m))([a, b], mask)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        uniform = (np_whiten(a, np.ones_like(mask)) + np_whiten(b, np.ones_like(mask))) / 2
        np.testing.assert_allclose(self.variant(adv.ensemble_rewards)([a, b]), uniform, rtol=1e-5, atol=1e-6)
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


class TipTokenWeightsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1.0, 1.0, 0.5), (2.0, 0.0, 0.3), (0.5, 1.5, 1.0), (1.0, 1.0, 0.01))
    def test_tip_token_weights(self, alpha, gamma, keep):
        rng = np.random.default_rng(7)
        entropy = rng.random((4, 6)).astype(np.float32) * 3
        divergence = rng.normal(size=(4, 6)).astype(np.float32)
        mask = rng.random((4, 6)) < 0.8
        mask[0] = False
        got = self.variant(
            lambda h, d, m: adv.tip_token_weights(h, d, m, alpha=alpha, gamma=gamma, keep_fraction=keep)
        )(entropy, divergence, mask)
        np.testing.assert_array_equal(got, np_tip(entropy, divergence, mask, alpha, gamma, keep))

def test_tip_token_weights_empty_mask_and_validation():
    zeros = np.zeros((2, 3), bool)
    np.testing.assert_array_equal(adv.tip_token_weights(np.ones((2, 3)), np.ones((2, 3)), zeros), 0.0)
    with pytest.raises(ValueError, match="keep_fraction"):
        adv.tip_token_weights(np.ones((2, 3)), np.ones((2, 3)), ~zeros, keep_fraction=0.0)
