"""aggregate(): every mode against a NumPy reference, empty rows, NaN-safe masking."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge.losses import AGGREGATIONS, aggregate


def np_aggregate(values, mask, mode, max_len=None):
    v = np.asarray(values, np.float64)
    m = np.asarray(mask, np.float64)
    vm = np.where(m != 0, v * m, 0.0)
    if mode == "token-mean":
        return vm.sum() / m.sum() if m.sum() else 0.0
    counted = [r for r in range(v.shape[0]) if (m[r] != 0).any()]  # rows that count
    if not counted:
        return 0.0
    if mode == "seq-mean-token-mean":
        return np.mean([vm[r].sum() / m[r].sum() for r in counted])
    if mode == "seq-mean-token-sum":
        return np.mean([vm[r].sum() for r in counted])
    return vm.sum() / (len(counted) * (max_len or v.shape[1]))


def make_inputs(seed=0, b=4, t=6):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(b, t)).astype(np.float32)
    mask = rng.random((b, t)) < 0.6
    mask[1] = False  # an empty row
    mask[2] = True  # a full row
    return values, mask


class AggregateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_modes_match_reference_bool_and_float_masks(self):
        values, mask = make_inputs()
        for mode in AGGREGATIONS:
            for m in (mask, mask.astype(np.float32)):
                fn = self.variant(lambda v, mm, mode=mode: aggregate(v, mm, mode))
                np.testing.assert_allclose(fn(values, m), np_aggregate(values, m, mode), rtol=1e-5, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_max_len_sets_dr_grpo_normalizer(self):
        values, mask = make_inputs(1)
        fn = self.variant(lambda v, m: aggregate(v, m, "seq-mean-token-sum-norm", max_len=32))
        np.testing.assert_allclose(
            fn(values, mask), np_aggregate(values, mask, "seq-mean-token-sum-norm", 32), rtol=1e-5
        )

    def test_float_mask_acts_as_weights(self):
        values, _ = make_inputs(2)
        weights = np.random.default_rng(3).random(values.shape).astype(np.float32)
        np.testing.assert_allclose(
            aggregate(values, weights, "token-mean"), (values * weights).sum() / weights.sum(), rtol=1e-5
        )

    def test_all_empty_mask_gives_zero_value_and_gradient(self):
        values = jnp.ones((3, 5))
        mask = jnp.zeros((3, 5), bool)
        for mode in AGGREGATIONS:
            value, grad = jax.value_and_grad(lambda v, mode=mode: aggregate(v, mask, mode))(values)
            self.assertEqual(float(value), 0.0)
            np.testing.assert_array_equal(grad, 0.0)

    def test_nan_and_inf_under_the_mask_do_not_leak(self):
        values, mask = make_inputs(4)
        poisoned = np.where(mask, values, np.nan).astype(np.float32)
        poisoned[0, ~mask[0]] = np.inf
        for mode in AGGREGATIONS:
            value, grad = jax.value_and_grad(lambda v, mode=mode: aggregate(v, mask, mode))(poisoned)
            np.testing.assert_allclose(value, np_aggregate(values, mask, mode), rtol=1e-5, atol=1e-7)
            self.assertTrue(np.all(np.isfinite(grad)))
            np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)

    def test_token_mean_gradient_is_mask_over_count(self):
        values, mask = make_inputs(5)
        grad = jax.grad(lambda v: aggregate(v, mask, "token-mean"))(values)
        np.testing.assert_allclose(grad, mask / mask.sum(), rtol=1e-6)

    def test_zero_weight_rows_do_not_dilute_sequence_means(self):
        """Rows with weight 0 (dropped groups) leave every mode's value as on the kept rows alone."""
        values, mask = make_inputs(6, b=6)
        mask[1] = True
        weight = np.array([1, 0, 1, 1, 0, 1], np.float32)
        kept = weight > 0
        for mode in AGGREGATIONS:
            with_dropped = aggregate(values, mask * weight[:, None], mode, max_len=8)
            kept_only = aggregate(values[kept], mask[kept], mode, max_len=8)
            np.testing.assert_allclose(with_dropped, kept_only, rtol=1e-6)
            np.testing.assert_allclose(with_dropped, np_aggregate(values[kept], mask[kept], mode, 8), rtol=1e-5)

    def test_unknown_mode_names_the_choices(self):
        with pytest.raises(ValueError, match="seq-mean-token-mean"):
            aggregate(jnp.ones((2, 2)), jnp.ones((2, 2)), "mean")
