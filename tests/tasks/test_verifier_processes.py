"""The verifier called from child processes (spawn, fork) and from worker threads: a hanging answer
still scores 0 within the per-call bound there, and the persistent worker pool is reused (workers
are started once, plus one replacement per deadline hit, never one per call). A forked child builds
its own pool and leaves the parent's workers alone. With more threads than workers the whole call,
the wait for a worker included, ends within its timeout: a call whose deadline passes while every
worker is busy scores 0 ("busy", in the pool's stats) and is not memoized.
"""

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from bridge.tasks.math import is_equivalent
from bridge.tasks.verifier_pool import default_pool, default_pool_stats

TIMEOUT_S = 1.0
BOUND_S = TIMEOUT_S + 3.0  # deadline + a replaced worker's imports on the next call
SLACK_S = 0.5  # a call returns within its timeout + this (thread wake-ups on a loaded machine)
SURE_HANG = "10^{10^{10^{6}}}!"  # sympy hangs in C on it: only the deadline ends the call
START_METHODS = [m for m in ("spawn", "fork") if m in multiprocessing.get_all_start_methods()]


def _square_roots(first: int, count: int) -> list[tuple[str, str]]:
    """("\\sqrt{n^2}", "n") pairs: true, need math-verify, and no other test uses them (no cache)."""
    return [(f"\\sqrt{{{n * n}}}", str(n)) for n in range(first, first + count)]


@pytest.mark.parametrize("method", START_METHODS)
def test_child_process_deadline_and_pool_reuse(method):
    parent_pool = default_pool()
    assert parent_pool.check("\\sqrt{4}", "2", 30.0) is True  # parent workers up: fork inherits them
    parent_before = parent_pool.stats()
    offset = 1000 * (1 + START_METHODS.index(method))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as child:

        def in_child(fn, *args):
            return child.submit(fn, *args).result(timeout=120)

        assert in_child(is_equivalent, *_square_roots(offset, 1)[0], 30.0) is True  # child's pool warm
        before = in_child(default_pool_stats)
        start = time.perf_counter()
        hung = in_child(is_equivalent, SURE_HANG, str(offset), TIMEOUT_S)
        hang_s = time.perf_counter() - start
        results = [in_child(is_equivalent, p, r, 30.0) for p, r in _square_roots(offset + 1, 6)]
        after = in_child(default_pool_stats)
    print(f"{method} child: hanging answer scored in {hang_s:.2f}s (timeout {TIMEOUT_S}s); {after}")
    assert hung is False and TIMEOUT_S <= hang_s < BOUND_S
    assert results == [True] * 6
    assert before["pid"] == after["pid"] != os.getpid()
    assert after["calls"] - before["calls"] == 7
    assert after["timeouts"] - before["timeouts"] == 1
    assert after["started"] - before["started"] == 1  # the hung worker's replacement only
    assert set(after["worker_pids"]).isdisjoint(parent_before["worker_pids"])
    # the parent's pool: same workers, still answering, untouched by the child and its exit
    assert parent_pool.check("\\sqrt{9}", "3", 30.0) is True
    parent_after = parent_pool.stats()
    assert parent_after["worker_pids"] == parent_before["worker_pids"]
    assert parent_after["timeouts"] == parent_before["timeouts"]


def _settled(pool, timeout_s: float = 120.0) -> dict:
    """The pool's stats once every worker is idle again (late checks finished, replacements up)."""
    deadline = time.monotonic() + timeout_s
    while (stats := pool.stats())["idle"] < pool.num_workers:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    return stats


def _concurrently(calls, threads: int | None = None) -> list[tuple[bool, float]]:
    """(result, seconds) of is_equivalent(predicted, reference, timeout_s=t) for each (predicted,
    reference, t): call i from thread i % threads (default: a thread per call), each thread's
    calls one after another, all threads started together."""
    threads = threads or len(calls)
    outcomes = [None] * len(calls)

    def run(first):
        for i in range(first, len(calls), threads):
            predicted, reference, timeout_s = calls[i]
            start = time.perf_counter()
            result = is_equivalent(predicted, reference, timeout_s=timeout_s)
            outcomes[i] = (result, time.perf_counter() - start)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    return outcomes


def test_worker_threads_deadline_and_pool_reuse():
    pool = default_pool()
    assert pool.check("\\sqrt{4}", "2", 30.0) is True  # workers up
    hangs = [(SURE_HANG, str(9000 + k), TIMEOUT_S) for k in range(4)]
    normal = [(p, r, 30.0) for p, r in _square_roots(3000, 4)]
    before = _settled(pool)
    outcomes = _concurrently(hangs + normal)
    after = _settled(pool)
    print(f"{len(outcomes)} threads on {pool.num_workers} workers: "
          f"slowest {max(s for _, s in outcomes):.2f}s; {after}")
    assert [result for result, _ in outcomes] == [False] * len(hangs) + [True] * len(normal)
    # every call ends within its own timeout, the wait for a worker included
    for (result, seconds), (_, _, timeout_s) in zip(outcomes, hangs + normal):
        assert seconds < timeout_s + SLACK_S, (seconds, timeout_s)
    delta = {k: after[k] - before[k] for k in ("calls", "timeouts", "started", "busy", "late")}
    unsent = delta["busy"] - delta["late"]  # hangs that never got a worker before their deadline
    assert delta["calls"] + unsent == len(hangs) + len(normal)
    # each hang that reached a worker hung it until its full timeout: one kill and one replacement
    # each (a late check too, once it ran past its timeout); none per call, and every worker is reused
    assert delta["timeouts"] == delta["calls"] - len(normal)
    assert delta["started"] == delta["timeouts"]
    assert len(after["worker_pids"]) == pool.num_workers


def test_four_threads_of_hostile_answers_each_end_within_the_timeout_and_busy_is_not_memoized():
    pool = default_pool()
    assert pool.num_workers == 2  # the default
    timeout_s = 1.0
    hostile = [(SURE_HANG, str(8000 + k), timeout_s) for k in range(12)]  # 3 calls per thread
    before = _settled(pool)
    outcomes = _concurrently(hostile, threads=4)
    after = _settled(pool)
    slowest = max(seconds for _, seconds in outcomes)
    waits, wait_s = after["waits"] - before["waits"], after["wait_s_total"] - before["wait_s_total"]
    busy = after["busy"] - before["busy"]
    print(f"4 threads x 3 hostile answers on 2 workers: slowest call {slowest:.2f}s (timeout {timeout_s}s), "
          f"{waits} waits for a worker ({wait_s:.2f}s in all), {busy} busy; {after}")
    assert [result for result, _ in outcomes] == [False] * len(hostile)
    assert slowest < timeout_s + SLACK_S
    # the waits are reported: two workers cannot serve four threads of 1 s hangs without them,
    # and no wait outlasts the call's timeout
    assert waits > 0 and busy > 0 and wait_s <= waits * (timeout_s + SLACK_S)
    assert after["calls"] - before["calls"] + busy - (after["late"] - before["late"]) == len(hostile)

    # a true answer that finds both workers busy until its deadline scores 0, and is not memoized:
    # the same call with a free worker checks it
    blockers = [threading.Thread(target=is_equivalent, args=(SURE_HANG, str(k), 3.0)) for k in (7001, 7002)]
    for thread in blockers:
        thread.start()
    deadline = time.monotonic() + 30
    while pool.stats()["idle"] > 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    true_pair = _square_roots(5000, 1)[0]
    busy_before = pool.stats()["busy"]
    start = time.perf_counter()
    assert is_equivalent(*true_pair, timeout_s=0.5) is False
    assert time.perf_counter() - start < 0.5 + SLACK_S
    assert pool.stats()["busy"] == busy_before + 1
    for thread in blockers:
        thread.join(timeout=60)
    _settled(pool)
    assert is_equivalent(*true_pair, timeout_s=0.5) is True
