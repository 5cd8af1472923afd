"""The verifier under adversarial answers: never raises, never hangs past its deadline.

Worst-case time per call is printed (run with -s) and bounded: timeout + worker restart slack.
"""

import time

from hypothesis import HealthCheck, given, settings, strategies as st

from bridge.tasks.math import extract_answer, is_equivalent
from bridge.tasks.verifier_pool import VerifierPool

TIMEOUT_S = 1.0
BOUND_S = TIMEOUT_S + 3.0  # deadline + a replaced worker's imports on the next call
WORST = {"time": 0.0, "input": None}

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


def _timed(predicted, reference):
    start = time.perf_counter()
    result = is_equivalent(predicted, reference, timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - start
    if elapsed > WORST["time"]:
        WORST.update(time=elapsed, input=(predicted[:60], reference[:60]))
    assert isinstance(result, bool)
    assert elapsed < BOUND_S, (elapsed, predicted[:80], reference[:80])
    return result


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


def test_worst_case_recorded_and_pool_recovers():
    # one sure hang on a private pool: the worker is killed, replaced, and the next call works
    pool = VerifierPool(num_workers=1)
    try:
        assert pool.check("\\sqrt{4}", "2", 30.0) is True  # worker started and warm
        start = time.perf_counter()
        assert pool.check("10^{10^{10^{6}}}!", "1", 1.0) is None  # sympy hangs in C: killed
        hang = time.perf_counter() - start
        assert pool.timeouts == 1 and hang < BOUND_S
        assert pool.check("\\frac{1}{2}", "0.5", 30.0) is True
    finally:
        pool.close()
    print(
        f"verifier worst case over the fuzz suite: {WORST['time']:.2f}s on {WORST['input']}; "
        f"forced hang returned in {hang:.2f}s (timeout {TIMEOUT_S}s)"
    )
    assert WORST["time"] < BOUND_S
