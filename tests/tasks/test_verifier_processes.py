"""The verifier called from child processes (spawn, fork) and from worker threads: a hanging answer
still scores 0 within the per-call bound there, and the persistent worker pool is reused (workers
are started once, plus one replacement per deadline hit, never one per call). A forked child builds
its own pool and leaves the parent's workers alone.
"""

import math
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


def test_worker_threads_deadline_and_pool_reuse():
    pool = default_pool()
    assert pool.check("\\sqrt{4}", "2", 30.0) is True  # workers up
    hangs = [(SURE_HANG, str(9000 + k)) for k in range(4)]
    normal = _square_roots(3000, 4)
    calls = [(p, r, False) for p, r in hangs] + [(p, r, True) for p, r in normal]
    outcomes = [None] * len(calls)

    def run(i):
        predicted, reference, _ = calls[i]
        start = time.perf_counter()
        result = is_equivalent(predicted, reference, timeout_s=TIMEOUT_S if i < len(hangs) else 30.0)
        outcomes[i] = (result, time.perf_counter() - start)

    before = pool.stats()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = pool.stats()
    # a call may queue behind every hang (one deadline + restart per round of workers) and then run
    bound_s = (math.ceil(len(hangs) / pool.num_workers) + 1) * BOUND_S
    slowest = max(seconds for _, seconds in outcomes)
    print(f"{len(calls)} threads on {pool.num_workers} workers: slowest call {slowest:.2f}s; {after}")
    assert [result for result, _ in outcomes] == [expected for _, _, expected in calls]
    assert slowest < bound_s
    assert after["calls"] - before["calls"] == len(calls)
    assert after["timeouts"] - before["timeouts"] == len(hangs)
    assert after["started"] - before["started"] == len(hangs)  # one replacement per hang, none per call
    assert len(after["worker_pids"]) == pool.num_workers
