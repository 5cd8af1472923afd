"""Teacher-student divergences against NumPy (float64) references; properties; gradients."""
import chex
import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import losses
from bridge.losses import (
    entropy,
    forward_cross_entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    topk_forward_kl,
    topk_generalized_jsd,
    topk_reverse_kl,
)

V = 11


# ---------------------------------------------------------------- NumPy references
def np_log_softmax(x, temperature=1.0):
    x = np.asarray(x, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl_probs(p, q):
    """sum p log(p / q) over the last axis, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def np_jsd_probs(ps, pt, beta):
    if beta == 0:
        return np_kl_probs(pt, ps)
    if beta == 1:
        return np_kl_probs(ps, pt)
    mix = (1 - beta) * ps + beta * pt
    return beta * np_kl_probs(pt, mix) + (1 - beta) * np_kl_probs(ps, mix)


def np_kl_log(la, lb):
    """sum exp(la) (la - lb): the KL from log-probs, exact for near-one-hot distributions."""
    return (np.exp(la) * (la - lb)).sum(-1)


def np_jsd_log(ls, lt, beta):
    if beta == 0:
        return np_kl_log(lt, ls)
    if beta == 1:
        return np_kl_log(ls, lt)
    lm = np.logaddexp(np.log(1 - beta) + ls, np.log(beta) + lt)
    return beta * np_kl_log(lt, lm) + (1 - beta) * np_kl_log(ls, lm)


def np_topk_log_bins(student, teacher, k):
    """Log-space bins for extreme logits: tail = log sum of the non-top-k probabilities."""
    ls, lt = np_log_softmax(student), np_log_softmax(teacher)
    ids = np.argsort(-lt, axis=-1, kind="stable")[..., :k]
    rest = np.ones(lt.shape, bool)
    np.put_along_axis(rest, ids, False, axis=-1)

    def bins(lp):
        peak = np.where(rest, lp, -np.inf).max(-1, keepdims=True)
        tail = peak + np.log(np.exp(np.where(rest, lp - peak, -np.inf)).sum(-1, keepdims=True))
        return np.concatenate([np.take_along_axis(lp, ids, -1), tail], -1)

    return bins(ls), bins(lt)


def np_topk_bins(student, teacher, k, temperature=1.0):
    """Top-k by teacher probability, then a tail bin of 1 - sum (computed by subtraction)."""
    ps = np.exp(np_log_softmax(student, temperature))
    pt = np.exp(np_log_softmax(teacher, temperature))
    ids = np.argsort(-pt, axis=-1, kind="stable")[..., :k]
    top_s = np.take_along_axis(ps, ids, -1)
    top_t = np.take_along_axis(pt, ids, -1)
    bins_s = np.concatenate([top_s, 1 - top_s.sum(-1, keepdims=True)], -1)
    bins_t = np.concatenate([top_t, 1 - top_t.sum(-1, keepdims=True)], -1)
    return bins_s, bins_t


def make_logits(seed=0, shape=(2, 3), scale=3.0):
    rng = np.random.default_rng(seed)
    student = (rng.normal(size=shape + (V,)) * scale).astype(np.float32)
    teacher = (rng.normal(size=shape + (V,)) * scale).astype(np.float32)
    return student, teacher


FULL = {  # name: (function, reference on probabilities, reference on log-probabilities)
    "forward_kl": (forward_kl, lambda ps, pt: np_kl_probs(pt, ps), lambda ls, lt: np_kl_log(lt, ls)),
    "reverse_kl": (reverse_kl, lambda ps, pt: np_kl_probs(ps, pt), lambda ls, lt: np_kl_log(ls, lt)),
    "jsd_0.3": (
        lambda s, t, **kw: generalized_jsd(s, t, beta=0.3, **kw),
        lambda ps, pt: np_jsd_probs(ps, pt, 0.3),
        lambda ls, lt: np_jsd_log(ls, lt, 0.3),
    ),
    "jsd_0.9": (
        lambda s, t, **kw: generalized_jsd(s, t, beta=0.9, **kw),
        lambda ps, pt: np_jsd_probs(ps, pt, 0.9),
        lambda ls, lt: np_jsd_log(ls, lt, 0.9),
    ),
    "forward_ce": (
        forward_cross_entropy,
        lambda ps, pt: -(pt * np.log(ps)).sum(-1),
        lambda ls, lt: -(np.exp(lt) * ls).sum(-1),
    ),
}
TOPK = {  # name: (function, reference on bin probabilities, reference on bin log-probabilities)
    "topk_forward_kl": (
        topk_forward_kl, lambda bs, bt: np_kl_probs(bt, bs), lambda ls, lt: np_kl_log(lt, ls)
    ),
    "topk_reverse_kl": (
        topk_reverse_kl, lambda bs, bt: np_kl_probs(bs, bt), lambda ls, lt: np_kl_log(ls, lt)
    ),
    "topk_jsd_0.5": (
        lambda s, t, k, **kw: topk_generalized_jsd(s, t, k, beta=0.5, **kw),
        lambda bs, bt: np_jsd_probs(bs, bt, 0.5),
        lambda ls, lt: np_jsd_log(ls, lt, 0.5),
    ),
    "topk_jsd_0": (
        lambda s, t, k, **kw: topk_generalized_jsd(s, t, k, beta=0.0, **kw),
        lambda bs, bt: np_kl_probs(bt, bs),
        lambda ls, lt: np_kl_log(lt, ls),
    ),
}


class DivergenceValuesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_full_vocabulary_forms(self):
        for temperature in (1.0, 0.7):
            student, teacher = make_logits(0)
            ps = np.exp(np_log_softmax(student, temperature))
            pt = np.exp(np_log_softmax(teacher, temperature))
            for name, (fn, ref, _) in FULL.items():
                got = self.variant(lambda s, t, fn=fn: fn(s, t, temperature=temperature))(student, teacher)
                chex.assert_shape(got, (2, 3))
                np.testing.assert_allclose(got, ref(ps, pt), rtol=1e-5, atol=1e-6, err_msg=name)

    @chex.variants(with_jit=True, without_jit=True)
    def test_topk_forms(self):
        for k in (1, 4, V - 1):
            for temperature in (1.0, 1.5):
                student, teacher = make_logits(1)
                bs, bt = np_topk_bins(student, teacher, k, temperature)
                for name, (fn, ref, _) in TOPK.items():
                    got = self.variant(lambda s, t, fn=fn, k=k: fn(s, t, k, temperature=temperature))(student, teacher)
                    chex.assert_shape(got, (2, 3))
                    np.testing.assert_allclose(got, ref(bs, bt), rtol=1e-5, atol=1e-6, err_msg=f"{name} k={k}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy(self):
        student, _ = make_logits(2)
        logp = np_log_softmax(student, 0.5)
        got = self.variant(lambda s: entropy(s, temperature=0.5))(student)
        np.testing.assert_allclose(got, -(np.exp(logp) * logp).sum(-1), rtol=1e-5, atol=1e-6)

    def test_large_logits_are_finite_and_exact(self):
        student, teacher = make_logits(3, scale=1e4)
        ls, lt = np_log_softmax(student), np_log_softmax(teacher)
        for name, (fn, _, ref) in FULL.items():
            grad = jax.grad(lambda s, fn=fn: fn(s, teacher).sum())(student)
            assert np.all(np.isfinite(grad)), name
            np.testing.assert_allclose(fn(student, teacher), ref(ls, lt), rtol=1e-5, atol=1e-5, err_msg=name)
        bs, bt = np_topk_log_bins(student, teacher, 3)
        for name, (fn, _, ref) in TOPK.items():
            grad = jax.grad(lambda s, fn=fn: fn(s, teacher, 3).sum())(student)
            assert np.all(np.isfinite(grad)), name
            np.testing.assert_allclose(fn(student, teacher, 3), ref(bs, bt), rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(entropy(student), -(np.exp(ls) * ls).sum(-1), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_at_large_logits_matches_float64(self):
        """|logits| ~ 1e4 with O(1) gaps (non-trivial entropy) and with O(1e4) gaps (near one-hot):
        value and gradient dH/dz = -p (log p + H) / temperature against float64 NumPy."""
        rng = np.random.default_rng(9)
        spread = (rng.normal(size=(4, V)) * 2).astype(np.float32)
        offsets = np.array([1e4, -1e4, 3e4, 0.0], np.float32)[:, None]
        cases = {
            "offset": (offsets + spread).astype(np.float32),
            "scaled": make_logits(10, shape=(4,), scale=1e4)[0],
        }
        for name, logits in cases.items():
            for temperature in (1.0, 0.5):
                logp = np_log_softmax(logits, temperature)
                want = -(np.exp(logp) * logp).sum(-1)
                want_grad = -np.exp(logp) * (logp + want[:, None]) / temperature
                got, grad = self.variant(
                    jax.value_and_grad(lambda z, t=temperature: entropy(z, temperature=t).sum())
                )(logits)
                got_rows = self.variant(lambda z, t=temperature: entropy(z, temperature=t))(logits)
                np.testing.assert_allclose(got_rows, want, rtol=1e-5, atol=1e-6, err_msg=name)
                np.testing.assert_allclose(got, want.sum(), rtol=1e-5, atol=1e-6, err_msg=name)
                np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6, err_msg=name)

    def test_tiny_tail_mass_stays_finite(self):
        """A teacher whose top-k holds all but ~e^-100 of the mass: the tail log-prob is exact."""
        student, teacher = make_logits(4)
        teacher[..., :2] = 200.0  # top-2 hold everything, tail mass ~ exp(-200) in f32 is 0
        got, grad = jax.value_and_grad(lambda s: topk_reverse_kl(s, teacher, 2).sum())(student)
        assert np.isfinite(got) and np.all(np.isfinite(grad))
        got = topk_forward_kl(student, teacher, 2)
        assert np.all(np.isfinite(got))


# ---------------------------------------------------------------- gradients
ALL = {name: fn for name, (fn, _, _) in FULL.items()}
ALL.update({name: (lambda s, t, fn=fn, **kw: fn(s, t, 4, **kw)) for name, (fn, _, _) in TOPK.items()})
ALL["topk_jsd_1"] = lambda s, t, **kw: topk_generalized_jsd(s, t, 4, beta=1.0, **kw)


@pytest.mark.parametrize("name", sorted(ALL))
def test_teacher_gets_no_gradient(name):
    student, teacher = make_logits(5)
    grad_teacher = jax.grad(lambda t: ALL[name](student, t, temperature=0.8).sum())(teacher)
    np.testing.assert_array_equal(grad_teacher, 0.0)


def test_forward_cross_entropy_gradient_matches_analytic():
    student, teacher = make_logits(6)
    for temperature in (1.0, 2.0):
        grad = jax.grad(lambda s: forward_cross_entropy(s, teacher, temperature=temperature).sum())(student)
        ps = np.exp(np_log_softmax(student, temperature))
        pt = np.exp(np_log_softmax(teacher, temperature))
        np.testing.assert_allclose(grad, (ps - pt) / temperature, rtol=1e-5, atol=1e-7)


def test_forward_kl_gradient_equals_cross_entropy_gradient():
    student, teacher = make_logits(7)
    chex.assert_trees_all_close(
        jax.grad(lambda s: forward_kl(s, teacher).sum())(student),
        jax.grad(lambda s: forward_cross_entropy(s, teacher).sum())(student),
        rtol=1e-5,
        atol=1e-7,
    )


def test_forward_cross_entropy_is_forward_kl_plus_teacher_entropy():
    student, teacher = make_logits(8)
    np.testing.assert_allclose(
        forward_cross_entropy(student, teacher), forward_kl(student, teacher) + entropy(teacher), rtol=1e-5
    )


# ---------------------------------------------------------------- properties
logits_strategy = hnp.arrays(np.float32, (3, V), elements=st.floats(-30, 30, width=32))
NONNEGATIVE = dict(ALL, topk_jsd_1=ALL["topk_jsd_1"])
NONNEGATIVE.pop("forward_ce")  # a cross-entropy, not a divergence


@settings(max_examples=30, deadline=None)
@given(student=logits_strategy, teacher=logits_strategy)
def test_divergences_nonnegative_and_zero_on_match(student, teacher):
    for name, fn in NONNEGATIVE.items():
        assert np.all(np.asarray(fn(student, teacher)) >= -1e-6), name
        np.testing.assert_allclose(fn(teacher, teacher), 0.0, atol=1e-5, err_msg=name)


# Generalized JSD (GKD, Agarwal et al. 2024) in the library's documented (TRL) convention:
#   M = (1 - beta) p_S + beta p_T,  JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M).
# Limits: for every 0 < beta < 1, with chi2(P || Q) = sum (P - Q)^2 / Q,
#   |JSD_beta / beta - KL(T || S)|             <= beta chi2(T || S),
#   |JSD_beta / (1 - beta) - KL(S || T)|       <= (1 - beta) chi2(S || T).
# Proof of the first (the second is the same with S <-> T, beta <-> 1 - beta): with r = (T - S) / S,
# M / S = 1 + beta r and JSD_beta / beta - KL(T || S) = -sum T log(1 + beta r) + (1 - beta) / beta KL(S || M).
# log(1 + x) <= x gives -sum T log(1 + beta r) >= -beta sum T r = -beta chi2(T || S), and KL(S || M) >= 0:
# the lower bound. -log(1 + x) <= -x + x^2 / (1 + x) and T / M <= 1 / beta give
# -sum T log(1 + beta r) <= -beta chi2 + beta^2 sum T (T - S)^2 / (S M) <= 0; KL(S || M) <= chi2(S || M)
# = beta^2 sum (T - S)^2 / M <= beta^2 chi2(T || S) / (1 - beta) since M >= (1 - beta) S: the upper bound.
# So JSD_beta / beta -> KL(T || S) as beta -> 0 and JSD_beta / (1 - beta) -> KL(S || T) as beta -> 1,
# which is what the exact endpoints beta = 0 and beta = 1 are defined to be.
JSD_BETAS = (1e-3, 0.5, 1.0 - 1e-3)


def np_generalized_jsd(p_s, p_t, beta):
    """Float64 generalized JSD straight from the formula above (0 < beta < 1, no special cases)."""
    p_s, p_t = np.asarray(p_s, np.float64), np.asarray(p_t, np.float64)
    m = (1.0 - beta) * p_s + beta * p_t
    kl = lambda p, q: np.sum(p * np.log(p / q), axis=-1)  # noqa: E731  (all entries > 0 here)
    return beta * kl(p_t, m) + (1.0 - beta) * kl(p_s, m)


def np_chi2(p, q):
    return np.sum((p - q) ** 2 / q, axis=-1)


def jsd_cases():
    """(student, teacher, temperature, k): random float32 logits; k for the top-k variant."""
    rng = np.random.default_rng(11)
    for temperature, scale, k in ((1.0, 2.0, 4), (0.7, 1.0, 1), (1.5, 3.0, V - 1)):
        student = (rng.normal(size=(4, 5, V)) * scale).astype(np.float32)
        teacher = (rng.normal(size=(4, 5, V)) * scale).astype(np.float32)
        yield student, teacher, temperature, k


def check_jsd_against_numpy(fn, bins):
    """fn(student, teacher, beta, temperature, k) -> float32 JSD; bins(student, teacher, k,
    temperature) -> float64 (p_S, p_T) on which the reference is computed."""
    for student, teacher, temperature, k in jsd_cases():
        p_s, p_t = bins(student, teacher, k, temperature)
        kl_ts, kl_st = np_kl_probs(p_t, p_s), np_kl_probs(p_s, p_t)
        for beta in JSD_BETAS:
            got = np.asarray(fn(student, teacher, beta, temperature, k), np.float64)
            want = np_generalized_jsd(p_s, p_t, beta)
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6, err_msg=f"beta={beta} T={temperature}")
        # near the endpoints the value over its small weight is the KL, within the bound above (with
        # the float32 error of the value, ~1e-6 absolute, divided by that weight); swapping either
        # pair of weights would make it ~1 / eps times too large.
        eps = 1e-3
        got = np.asarray(fn(student, teacher, eps, temperature, k), np.float64) / eps
        assert np.all(np.abs(got - kl_ts) <= eps * np_chi2(p_t, p_s) + 1e-6 / eps), np.max(np.abs(got - kl_ts))
        got = np.asarray(fn(student, teacher, 1.0 - eps, temperature, k), np.float64) / eps
        assert np.all(np.abs(got - kl_st) <= eps * np_chi2(p_s, p_t) + 1e-6 / eps), np.max(np.abs(got - kl_st))
        # the exact endpoints are defined as those limits: KL(T || S) at 0 and KL(S || T) at 1
        np.testing.assert_allclose(fn(student, teacher, 0.0, temperature, k), kl_ts, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fn(student, teacher, 1.0, temperature, k), kl_st, rtol=1e-5, atol=1e-6)


def test_generalized_jsd_matches_float64_numpy_near_and_at_the_endpoints():
    def softmax_pair(student, teacher, k, temperature):
        return np.exp(np_log_softmax(student, temperature)), np.exp(np_log_softmax(teacher, temperature))

    check_jsd_against_numpy(
        lambda s, t, beta, temperature, k: generalized_jsd(s, t, beta=beta, temperature=temperature), softmax_pair)


def test_topk_generalized_jsd_matches_float64_numpy_near_and_at_the_endpoints():
    """Same checks on the k + 1 bins: the teacher's k most likely tokens, then the tail mass."""
    check_jsd_against_numpy(
        lambda s, t, beta, temperature, k: topk_generalized_jsd(s, t, k, beta=beta, temperature=temperature),
        np_topk_bins)


@settings(max_examples=30, deadline=None)
@given(student=logits_strategy, teacher=logits_strategy, k=st.integers(1, V - 1))
def test_topk_never_exceeds_full_divergence(student, teacher, k):
    """Merging bins can only lose information (data-processing inequality)."""
    pairs = ((topk_forward_kl, forward_kl), (topk_reverse_kl, reverse_kl))
    for topk_fn, full_fn in pairs:
        topk_value = np.asarray(topk_fn(student, teacher, k))
        full_value = np.asarray(full_fn(student, teacher))
        assert np.all(topk_value <= full_value + 1e-4 + 1e-5 * np.abs(full_value))


def test_validation():
    student, teacher = make_logits(9)
    with pytest.raises(ValueError, match="k < V"):
        topk_forward_kl(student, teacher, V)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student, teacher, beta=1.5)
