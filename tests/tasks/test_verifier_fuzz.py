"""The verifier under adversarial answers: never raises, never hangs past its deadline.

Every call is bounded by timeout + worker restart slack; `test_worst_case_is_measured_and_bounded`
times one answer of each adversarial family itself and prints the worst case (run with -s).
"""

import time

from hypothesis import HealthCheck, given, settings, strategies as st

from bridge.tasks.math import _slow_equivalent, extract_answer, is_equivalent
from bridge.tasks.verifier_pool import VerifierPool

TIMEOUT_S = 1.0
BOUND_S = TIMEOUT_S + 3.0  # deadline + a replaced worker's imports on the next call
SURE_HANG = "10^{10^{10^{6}}}!"  # sympy hangs in C on it: only the deadline ends the call

_PATHOLOGICAL = st.one_of(
    st.integers(2, 12).map(lambda n: "2^{" * n + "10" + "}" * n),
    st.integers(50, 3000).map(lambda n: "\\frac{" * n + "1"),
    st.integers(50, 3000).map(lambda n: "(" * n + "x" + ")" * n),
    st.integers(100, 2000).map(lambda n: "\\sqrt{" * n + "2" + "}" * n),
    st.integers(5, 9).map(lambda n: f"10^{{10^{{10^{{{n}}}}}}}!"),
    st.integers(5, 12).map(lambda n: f"{n}!!!!!!!!" + f"^{{{n}^{{{n}}}}}"),
    st.just("9" * 100_000),
    st.just("x" * 100_000),
    st.just("}{" * 50_000),
    st.just("\\begin{pmatrix}" * 200),
    st.just("\\boxed{" * 1000),
    st.text(alphabet=st.characters(), max_size=300),
    st.text(alphabet="0123456789^{}()\\frac sqrt+-*/!.,=xe", max_size=400),
)


# One answer of each family above, the sure hang among them.
_REPRESENTATIVE = [
    "2^{" * 8 + "10" + "}" * 8,
    "\\frac{" * 1000 + "1",
    "(" * 1000 + "x" + ")" * 1000,
    "\\sqrt{" * 1000 + "2" + "}" * 1000,
    SURE_HANG,
    "9!!!!!!!!^{9^{9}}",
    "9" * 100_000,
    "x" * 100_000,
    "}{" * 50_000,
    "\\begin{pmatrix}" * 200,
    "\\boxed{" * 1000,
    "\u202e\U0001f600\\frac{\u00bd}{\u2212}\x00",
    "((2^{10}!)^{x})! = e^{\\sqrt{-1}",
]


def _timed(predicted, reference):
    """(result, seconds) of one verifier call; asserts a bool within BOUND_S."""
    start = time.perf_counter()
    result = is_equivalent(predicted, reference, timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - start
    assert isinstance(result, bool)
    assert elapsed < BOUND_S, (elapsed, predicted[:80], reference[:80])
    return result, elapsed


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(predicted=_PATHOLOGICAL, reference=st.sampled_from(["1", "\\frac{1}{2}", "x^2", "2^{100}"]))
def test_pathological_answers_are_bounded(predicted, reference):
    _timed(predicted, reference)
    assert extract_answer(predicted) is None or isinstance(extract_answer(predicted), str)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=2000))
def test_extract_then_verify_random_text(text):
    answer = extract_answer(text)
    if answer is not None:
        _timed(answer, "42")


def test_worst_case_is_measured_and_bounded():
    _slow_equivalent.cache_clear()  # answers cached by other tests would be timed at ~0s
    worst_time, worst_input = 0.0, None
    for predicted in _REPRESENTATIVE:
        for reference in ("1", "x^2"):
            result, elapsed = _timed(predicted, reference)
            assert result is False
            if elapsed > worst_time:
                worst_time, worst_input = elapsed, (predicted[:40], reference)
    print(
        f"verifier worst case over {2 * len(_REPRESENTATIVE)} adversarial calls: "
        f"{worst_time:.2f}s on {worst_input} (timeout {TIMEOUT_S}s, bound {BOUND_S}s)"
    )
    assert worst_time > 0
    assert worst_time >= 0.9 * TIMEOUT_S  # the sure hang ran until the deadline: a real measurement
    assert worst_time < BOUND_S


def test_pool_replaces_a_hung_worker():
    # one sure hang on a private pool: the worker is killed, replaced, and the next call works
    pool = VerifierPool(num_workers=1)
    try:
        assert pool.check("\\sqrt{4}", "2", 30.0) is True  # worker started and warm
        start = time.perf_counter()
        assert pool.check(SURE_HANG, "1", TIMEOUT_S) is None  # killed at the deadline
        hang = time.perf_counter() - start
        assert pool.timeouts == 1 and TIMEOUT_S <= hang < BOUND_S
        assert pool.check("\\frac{1}{2}", "0.5", 30.0) is True
        assert pool.stats()["started"] == 2  # the first worker and its one replacement
    finally:
        pool.close()
    print(f"forced hang returned in {hang:.2f}s (timeout {TIMEOUT_S}s)")
