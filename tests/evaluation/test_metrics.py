"""pass@k, avg@k and maj@k against exact combinatorics and hand-made cases."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.evaluation import avg_at_k, maj_at_k, pass_at_k


def exact_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_binomials():
    for n in (1, 2, 5, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                np.testing.assert_allclose(pass_at_k(n, c, k), exact_pass_at_k(n, c, k), rtol=1e-12, atol=1e-15)


def test_pass_at_k_by_enumeration():
    """Fraction of k-subsets with at least one correct sample."""
    samples = [1, 0, 0, 1, 0, 0, 0]
    for k in range(1, len(samples) + 1):
        subsets = list(itertools.combinations(samples, k))
        want = sum(any(s) for s in subsets) / len(subsets)
        np.testing.assert_allclose(pass_at_k(len(samples), sum(samples), k), want, rtol=1e-12)


def test_pass_at_k_vectorized_over_problems_with_different_n():
    n = np.array([10, 4, 200, 7, 3])
    c = np.array([3, 0, 17, 7, 1])
    got = pass_at_k(n, c, 3)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, [exact_pass_at_k(a, b, 3) for a, b in zip(n, c)], rtol=1e-12)
    np.testing.assert_allclose(pass_at_k(100, 1, [1, 10]), [0.01, 0.1], rtol=1e-12)


def test_pass_at_k_large_n_is_stable():
    np.testing.assert_allclose(pass_at_k(1000, 10, 100), exact_pass_at_k(1000, 10, 100), rtol=1e-10)


def test_pass_at_k_validation():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), data=st.data())
def test_pass_at_k_monotone_in_c_and_k(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    if c < n:
        assert pass_at_k(n, c + 1, k) >= value - 1e-12
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12
    np.testing.assert_allclose(pass_at_k(n, c, 1), c / n, rtol=1e-12, atol=1e-15)


def test_avg_at_k():
    correct = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_allclose(avg_at_k(correct), [0.75, 0.0, 1.0])


def test_maj_at_k():
    answers = [
        ["4", "5", "5", "4", "5"],  # majority 5 (wrong)
        ["7", None, None, None, "3"],  # None does not vote; tie 7/3 -> first seen (7, right)
        [None, None],  # nobody answered
        ["2", "2", "9", "9", "9"],  # first 3 samples: 2 wins; all 5: 9 wins
    ]
    correct = [[1, 0, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0], [0, 0, 1, 1, 1]]
    np.testing.assert_array_equal(maj_at_k(answers, correct), [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(maj_at_k(answers, correct, k=3), [0.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="verdict"):
        maj_at_k([["1", "2"]], [[1]])
