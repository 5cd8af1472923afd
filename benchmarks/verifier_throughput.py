"""Throughput of `bridge.tasks.math.is_equivalent` on ordinary answers.

  python benchmarks/verifier_throughput.py [--n 2000] [--threads 4]

fast path: numeric/string answers (GSM8K-style) checked in-process;
math-verify path: LaTeX answers (MATH-style, each pair distinct so the memo never hits) checked in
the persistent worker pool (BRIDGE_VERIFIER_WORKERS workers), from one thread and from --threads.
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from bridge.tasks.math import _slow_equivalent, is_equivalent
from bridge.tasks.verifier_pool import default_pool


def rate(pairs, threads=1):
    start = time.perf_counter()
    if threads == 1:
        results = [is_equivalent(p, r) for p, r in pairs]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda pr: is_equivalent(*pr), pairs))
    return len(pairs) / (time.perf_counter() - start), sum(results)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    fast = [(f"{i:,}", str(i)) for i in range(args.n // 2)] + [
        (f"\\frac{{{i}}}{{3}}", f"{i}/3") for i in range(args.n // 2)
    ]
    slow = lambda tag: [
        (f"\\frac{{\\sqrt{{{i}}}}}{{{tag}}}", f"\\sqrt{{{i}}}/{tag}") for i in range(args.n // 10)
    ]
    default_pool().check("1", "1", 30.0)  # start the workers
    fast_rate, fast_ok = rate(fast)
    print(f"fast path:          {fast_rate:10,.0f} calls/s ({fast_ok}/{len(fast)} equivalent)")
    slow_rate, slow_ok = rate(slow(2))
    print(f"math-verify, 1 thread: {slow_rate:7,.0f} calls/s ({slow_ok}/{len(slow(2))} equivalent)")
    _slow_equivalent.cache_clear()
    slow_rate, slow_ok = rate(slow(3), args.threads)
    print(
        f"math-verify, {args.threads} threads: {slow_rate:6,.0f} calls/s "
        f"({slow_ok}/{len(slow(3))} equivalent, {default_pool().num_workers} workers)"
    )


if __name__ == "__main__":
    main()
