"""Advantages and dense rewards against NumPy references."""
import chex
import jax
import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bridge import advantages as adv


def np_group(rewards, g, scale, eps=1e-6, spread_tol=1e-3):
    out = []
    for group in np.asarray(rewards, np.float64).reshape(-1, g):
        if group.max() - group.min() <= spread_tol:
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
    def test_near_equal_group_gets_zero(self):
        # Regression: an all-correct group minus distinct per-sequence KL penalties (~5e-5)
        # was normalized by its tiny std into advantages of order 1 (pure noise).
        kl = np.array([5e-5, 0.0, 2e-5, 4e-5], np.float32)
        near_equal = np.float32(1.0) - kl
        real = np.array([1, 0, 0, 1], np.float32) - np.array([3e-5, 1e-5, 5e-5, 2e-5], np.float32)
        rewards = np.concatenate([near_equal, real])
        for scale in ("std", "none"):
            got = np.asarray(self.variant(lambda r, scale=scale: adv.group_advantages(r, 4, scale=scale))(rewards))
            np.testing.assert_array_equal(got[:4], 0.0)
            g = real.astype(np.float64)
            want = (g - g.mean()) / (g.std(ddof=1) + 1e-6) if scale == "std" else g - g.mean()
            np.testing.assert_allclose(got[4:], want, rtol=1e-5, atol=1e-6)
        # spread_tol=0 keeps only the exact-equality guard: the noise is amplified again
        # (loose atol: the float32 mean near 1.0 is off by an ulp, ~1e-3 of the 5e-5 spread).
        exact = np.asarray(adv.group_advantages(near_equal, 4, spread_tol=0.0))
        g = near_equal.astype(np.float64)
        np.testing.assert_allclose(exact, (g - g.mean()) / (g.std(ddof=1) + 1e-6), atol=1e-2)
        assert np.abs(exact).max() > 1.0

    def test_spread_tolerance_boundary(self):
        at = np.float32(1e-3)  # spread == spread_tol (both rounded to float32): zeroed
        above = np.nextafter(at, np.float32(1))  # one float32 step above: normalized
        for scale in ("std", "none"):
            np.testing.assert_array_equal(
                adv.group_advantages(np.array([0, 0, at, 0], np.float32), 4, scale=scale), 0.0)
            got = adv.group_advantages(np.array([0, 0, above, 0], np.float32), 4, scale=scale)
            centered = np.array([-0.25, -0.25, 0.75, -0.25]) * np.float64(above)
            std = np.float64(above) / 2  # sample std (ddof=1) of [0, 0, a, 0]
            want = centered / (std + 1e-6) if scale == "std" else centered
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
        # A custom tolerance, exactly representable: spread 0.25 is flat, 0.5 is not.
        rewards = np.array([1, 0.75, 1, 1, 1, 0.5, 1, 1], np.float32)
        got = adv.group_advantages(rewards, 4, spread_tol=0.25)
        np.testing.assert_array_equal(got[:4], 0.0)
        np.testing.assert_allclose(got[4:], [0.5, -1.5, 0.5, 0.5], rtol=1e-5)  # mean 0.875, std (ddof=1) 0.25
        # Within the tolerance at any offset, also for the registry estimators.
        rng = np.random.default_rng(3)
        flat = (rng.uniform(-10, 10, (5, 1)) + rng.uniform(0, 9e-4, (5, 4))).astype(np.float32).reshape(-1)
        for name in ("grpo", "drgrpo"):
            np.testing.assert_array_equal(adv.advantage_estimator(name)(flat, 4), 0.0)

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
        with pytest.raises(ValueError, match="spread_tol"):
            adv.group_advantages(jnp.ones(4), 2, spread_tol=-1.0)
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
        if group.max() - group.min() <= 1e-3:
            np.testing.assert_array_equal(a, 0.0)  # flat groups: exactly 0, never NaN
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

def np_tip(entropy, divergence, mask, rule, keep_fraction, entropy_quantile, divergence_quantile):
    """NumPy reference: sort for the entropy rule, np.quantile over masked tokens for Q3."""
    m = np.asarray(mask, bool)
    h, d = np.asarray(entropy, np.float64), np.asarray(divergence, np.float64)
    n = int(m.sum())
    by_entropy = np.zeros(h.shape, bool)
    if n:
        count = max(int(np.floor(keep_fraction * n + 0.5)), 1)
        ranked = sorted((-h.flat[i], i) for i in np.flatnonzero(m.ravel()))  # ties: earlier index
        by_entropy.flat[[i for _, i in ranked[:count]]] = True
    q3 = np.zeros(h.shape, bool)
    if n:
        q3 = m & (h < np.quantile(h[m], entropy_quantile)) & (d > np.quantile(d[m], divergence_quantile))
    keep = {"entropy": by_entropy, "q3": q3, "union": by_entropy | q3}[rule]
    return keep.astype(np.float32)


# One token per quadrant of (entropy H, divergence D), spread over two rows, plus padding
# whose values are extreme so that any leak of padding into the statistics shows.
#   A (0, 0) high H / high D     B (0, 2) high H / low D
#   C (1, 1) low H / high D      D (1, 3) low H / low D      padding: (0, 1), (0, 3), (1, 0), (1, 2)
# Masked H = [2.0, 1.5, 0.1, 0.05] (median 0.8), masked D = [3.0, 0.2, 2.5, 0.1] (median 1.35).
QUADRANT_MASK = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], bool)
QUADRANT_H = np.array([[2.0, 50.0, 1.5, -50.0], [-50.0, 0.1, 50.0, 0.05]], np.float32)
QUADRANT_D = np.array([[3.0, 50.0, 0.2, 50.0], [-50.0, 2.5, 50.0, 0.1]], np.float32)
A, B, C, D = (0, 0), (0, 2), (1, 1), (1, 3)
QUADRANT_KEPT = {"entropy": [A, B], "q3": [C], "union": [A, B, C]}


def positions(*cells):
    out = np.zeros((2, 4), np.float32)
    for cell in cells:
        out[cell] = 1.0
    return out


class TipTokenWeightsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("entropy", "q3", "union")
    def test_quadrants(self, rule):
        got = self.variant(lambda h, d, m: adv.tip_token_weights(h, d, m, rule=rule))(
            QUADRANT_H, QUADRANT_D, QUADRANT_MASK)
        self.assertEqual(got.dtype, jnp.float32)
        self.assertEqual(got.shape, (2, 4))
        np.testing.assert_array_equal(got, positions(*QUADRANT_KEPT[rule]))

    def test_quadrants_default_rule_is_union(self):
        got = adv.tip_token_weights(QUADRANT_H, QUADRANT_D, QUADRANT_MASK)
        np.testing.assert_array_equal(got, positions(A, B, C))

    @parameterized.parameters("entropy", "q3", "union")
    def test_padding_does_not_move_selection(self, rule):
        # Padding with NaN, +-inf or huge values, or flipped to the other extreme, changes nothing:
        # the quantiles and the ranking see masked tokens only.
        for pad_h, pad_d in ((np.nan, np.nan), (np.inf, -np.inf), (-1e30, 1e30), (1e30, -1e30), (0.08, 2.0)):
            h = np.where(QUADRANT_MASK, QUADRANT_H, np.float32(pad_h))
            d = np.where(QUADRANT_MASK, QUADRANT_D, np.float32(pad_d))
            got = adv.tip_token_weights(h, d, QUADRANT_MASK, rule=rule)
            np.testing.assert_array_equal(got, positions(*QUADRANT_KEPT[rule]), err_msg=f"pad {pad_h}, {pad_d}")
        # Contrast: the same padding values (0.08, 2.0) as real tokens do move the Q3 thresholds.
        # All masked: H median is 0.8 -> 0.09 (C at 0.1 is no longer low), so Q3 is the new tokens.
        h = np.where(QUADRANT_MASK, QUADRANT_H, np.float32(0.08))
        d = np.where(QUADRANT_MASK, QUADRANT_D, np.float32(2.0))
        got = adv.tip_token_weights(h, d, np.ones((2, 4), bool), rule="q3")
        np.testing.assert_array_equal(got, np_tip(h, d, np.ones((2, 4)), "q3", 0.5, 0.5, 0.5))
        assert got[C] == 0.0

    def test_overconfident_token_kept(self):
        # Regression: a token with H = 0.02 (the lowest in the batch) and D = 16x the batch's
        # mean divergence (the student is confident, the teacher disagrees). The old score
        # (H / mean H) * (D / mean D) ranked it last, so it was the first token dropped at keep 0.5.
        rng = np.random.default_rng(11)
        h = rng.uniform(0.8, 2.0, (4, 20)).astype(np.float32)
        d = rng.uniform(0.9, 1.1, (4, 20)).astype(np.float32)
        mask = np.zeros((4, 20), bool)
        mask[:, :16] = True  # 64 masked tokens, four padded columns per row
        h[~mask], d[~mask] = 1e3, 1e3
        special = (2, 5)
        others = mask.copy()
        others[special] = False
        d[others] *= np.float32(63.0 / d[others].sum())  # the other 63 sum to 63
        h[special], d[special] = 0.02, 21.0  # mean D = (21 + 63) / 64 = 1.3125; 21 = 16 * 1.3125
        np.testing.assert_allclose(d[special] / d[mask].mean(), 16.0, rtol=1e-5)
        assert h[special] == h[mask].min() and d[special] == d[mask].max()
        product = (h / h[mask].mean()) * (d / d[mask].mean())  # fixture check: the old score ...
        assert product[special] < product[others].min()  # ... ranked this token last
        weights = {rule: np.asarray(adv.tip_token_weights(h, d, mask, rule=rule, keep_fraction=0.5))
                   for rule in ("entropy", "q3", "union")}
        assert weights["entropy"][special] == 0.0  # entropy alone misses it ...
        assert weights["q3"][special] == 1.0  # ... Q3 keeps it
        assert weights["union"][special] == 1.0
        assert weights["entropy"].sum() == 32.0
        for rule, got in weights.items():
            np.testing.assert_array_equal(got, np_tip(h, d, mask, rule, 0.5, 0.5, 0.5), err_msg=rule)

    def test_entropy_rule_count_and_ties(self):
        mask = np.array([[0, 1, 1, 1], [1, 1, 0, 1]], bool)
        h = np.array([[9.0, 1.0, 1.0, 1.0], [1.0, 1.0, 9.0, 1.0]], np.float32)  # masked H all tied
        d = np.zeros((2, 4), np.float32)
        # 6 masked tokens; ties go to the earliest positions (row-major).
        got = adv.tip_token_weights(h, d, mask, rule="entropy", keep_fraction=0.5)
        np.testing.assert_array_equal(got, [[0, 1, 1, 1], [0, 0, 0, 0]])
        got = adv.tip_token_weights(h, d, mask, rule="entropy", keep_fraction=0.01)  # at least one
        np.testing.assert_array_equal(got, [[0, 1, 0, 0], [0, 0, 0, 0]])
        got = adv.tip_token_weights(h, d, mask, rule="entropy", keep_fraction=1.0)
        np.testing.assert_array_equal(got, mask)
        # All masked entropies equal: nothing is strictly below the median, so no Q3 tokens.
        np.testing.assert_array_equal(adv.tip_token_weights(h, d + mask, mask, rule="q3"), 0.0)

    def test_q3_bounds_are_strict(self):
        # 5 masked tokens: the 0.5 quantiles are the middle elements H = 3 and D = 30 exactly.
        mask = np.array([[1, 1, 1, 1, 1, 0]], bool)
        h = np.array([[1.0, 3.0, 2.0, 4.0, 5.0, 0.0]], np.float32)
        d = np.array([[50.0, 40.0, 30.0, 20.0, 10.0, 99.0]], np.float32)
        # H < 3: positions 0, 2; D > 30: positions 0, 1. Position 2 (D == 30) is out.
        np.testing.assert_array_equal(adv.tip_token_weights(h, d, mask, rule="q3"), [[1, 0, 0, 0, 0, 0]])
        # Quantiles 0.75 / 0.25: H < 4 and D > 20 -> positions 0, 1, 2.
        got = adv.tip_token_weights(h, d, mask, rule="q3", entropy_quantile=0.75, divergence_quantile=0.25)
        np.testing.assert_array_equal(got, [[1, 1, 1, 0, 0, 0]])
        # Extreme quantiles: nothing is below the minimum H or above the maximum D.
        for eq, dq in ((0.0, 0.5), (0.5, 1.0)):
            got = adv.tip_token_weights(h, d, mask, rule="q3", entropy_quantile=eq, divergence_quantile=dq)
            np.testing.assert_array_equal(got, 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        ("entropy", 0.3, 0.5, 0.5), ("q3", 0.5, 0.2, 0.8), ("union", 0.5, 0.5, 0.5), ("union", 0.1, 0.3, 0.7),
        ("union", 1.0, 0.5, 0.5),
    )
    def test_matches_numpy(self, rule, keep, eq, dq):
        rng = np.random.default_rng(7)
        entropy = rng.random((4, 7)).astype(np.float32) * 3
        divergence = rng.normal(size=(4, 7)).astype(np.float32)
        mask = rng.random((4, 7)) < 0.8
        mask[0] = False
        for m in (mask, mask.astype(np.float32)):
            got = self.variant(lambda h, d, m: adv.tip_token_weights(
                h, d, m, rule=rule, keep_fraction=keep, entropy_quantile=eq, divergence_quantile=dq))(
                entropy, divergence, m)
            np.testing.assert_array_equal(got, np_tip(entropy, divergence, mask, rule, keep, eq, dq))
            np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)  # never off the mask

    def test_jit_matches_eager(self):
        rng = np.random.default_rng(5)
        h, d = rng.random((3, 9)).astype(np.float32), rng.normal(size=(3, 9)).astype(np.float32)
        mask = rng.random((3, 9)) < 0.7
        for rule in adv.TIP_RULES:
            fn = jax.jit(adv.tip_token_weights, static_argnames=("rule", "keep_fraction"))
            np.testing.assert_array_equal(fn(h, d, mask, rule=rule, keep_fraction=0.4),
                                          adv.tip_token_weights(h, d, mask, rule=rule, keep_fraction=0.4))

    def test_no_gradient(self):
        grads = jax.grad(lambda h, d: jnp.sum(adv.tip_token_weights(h, d, QUADRANT_MASK) * (h + d)), (0, 1))(
            jnp.asarray(QUADRANT_H), jnp.asarray(QUADRANT_D))
        # Only the explicit (h + d) factor carries gradient: the weights themselves are constants.
        for g in grads:
            np.testing.assert_array_equal(g, positions(*QUADRANT_KEPT["union"]))


def test_tip_token_weights_empty_mask_and_validation():
    zeros = np.zeros((2, 3), bool)
    for rule in adv.TIP_RULES:
        np.testing.assert_array_equal(adv.tip_token_weights(np.ones((2, 3)), np.ones((2, 3)), zeros, rule=rule), 0.0)
    ones = np.ones((2, 3))
    with pytest.raises(ValueError, match="entropy.*q3.*union"):
        adv.tip_token_weights(ones, ones, ~zeros, rule="product")
    for kwargs, name in (
        ({"keep_fraction": 0.0}, "keep_fraction"), ({"keep_fraction": 1.5}, "keep_fraction"),
        ({"entropy_quantile": -0.1}, "entropy_quantile"), ({"entropy_quantile": 1.1}, "entropy_quantile"),
        ({"divergence_quantile": 2.0}, "divergence_quantile"),
    ):
        with pytest.raises(ValueError, match=name):
            adv.tip_token_weights(ones, ones, ~zeros, **kwargs)
