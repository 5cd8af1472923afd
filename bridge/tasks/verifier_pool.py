"""Persistent worker processes with a hard per-call deadline for slow answer checkers.

`VerifierPool.check(predicted, reference, timeout_s)` sends one comparison to an idle worker
(`verifier_worker.py`, a long-lived subprocess) and waits with `select` on its stdout, so the
deadline needs no signals and works from any thread. The whole call, waiting for a free worker
included, ends within `timeout_s`:

  - a worker answered in time: its verdict (True/False);
  - the call got a worker at once and the check ran out of `timeout_s`, or the worker died:
    None (a verdict: this input does not check within the timeout); the worker is killed and
    replaced;
  - every worker stayed busy until the deadline, or the check ran out of the time the wait left
    it: `VerifierBusy` (no verdict; callers score it wrong and must not memoize it). A worker
    whose check was cut short this way is not killed: it finishes the check in the background
    within the full `timeout_s` and goes back to the pool (killed and replaced only if it runs
    past that, like any hung check).

Replacements start in the background (a thread reads their "ready" line and then offers them to
callers), so no caller's time goes to a worker's imports; the first workers are started and
awaited when the pool is built. No process is created per call. `stats()` counts calls,
timeouts, replacements, waits (count, total and longest seconds) and busy calls.

A pool belongs to the process that built it. A child made by fork() does not use the default pool
it inherited (its pipes lead to the parent's workers, its locks may be held by parent threads that
do not exist in the child): `default_pool()` builds a fresh one there, and the parent's workers are
neither used nor killed by the child, also not when the child exits.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verifier_worker.py")
STARTUP_TIMEOUT_S = 120.0
_MAX_START_FAILURES = 3  # a replacement that fails to start is retried this many times in a row


class VerifierBusy(TimeoutError):
    """No verdict within the call's deadline because every worker was busy (see the module
    docstring): score the answer wrong for now, and do not memoize it."""


class _Worker:
    """One subprocess and the bytes it has written but we have not consumed yet."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-P", _WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self.buffer = b""

    def read_line(self, deadline: float) -> bytes | None:
        """The next output line, or None at the deadline or when the worker died."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                readable, _, _ = select.select([fd], [], [], remaining)
                if not readable:
                    return None
                chunk = os.read(fd, 65536)
            except (OSError, ValueError):  # closed by `kill` from another thread (pool closed)
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def send(self, predicted: str, reference: str, timeout_s: float) -> bool:
        request = json.dumps({"p": predicted, "r": reference, "t": timeout_s}) + "\n"
        try:
            self.process.stdin.write(request.encode())
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


class VerifierPool:
    """`num_workers` persistent checker processes shared by all threads."""

    def __init__(self, num_workers: int = 2):
        self.num_workers = num_workers
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._start_failures = 0
        self.calls = 0
        self.timeouts = 0
        self.started = 0
        self.waits = 0
        self.wait_s_total = 0.0
        self.wait_s_max = 0.0
        self.busy = 0
        self.late = 0
        workers = [self._start() for _ in range(num_workers)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for worker in workers:
            if worker.read_line(deadline) != b"ready":
                self.close()
                raise RuntimeError("verifier worker failed to start (is math-verify installed?)")
            self._idle.put(worker)

    def _start(self) -> _Worker:
        worker = _Worker()
        with self._lock:
            self._all.append(worker)
            self.started += 1
        return worker

    def _remove(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def _replace(self, worker: _Worker) -> None:
        """Kills a hung or dead worker; its replacement starts now and joins the idle workers
        from a background thread once its imports are done."""
        self._remove(worker)
        with self._lock:
            self.timeouts += 1
            if self._closed:
                return
        fresh = self._start()
        threading.Thread(target=self._offer_when_ready, args=(fresh,), daemon=True).start()

    def _offer_when_ready(self, worker: _Worker) -> None:
        ready = worker.read_line(time.monotonic() + STARTUP_TIMEOUT_S) == b"ready"
        with self._lock:
            closed = self._closed
            self._start_failures = 0 if ready else self._start_failures + 1
            retry = not ready and not closed and self._start_failures <= _MAX_START_FAILURES
        if ready and not closed:
            self._idle.put(worker)
            return
        self._remove(worker)
        if retry:
            fresh = self._start()
            threading.Thread(target=self._offer_when_ready, args=(fresh,), daemon=True).start()

    def _finish_late(self, worker: _Worker, hard_deadline: float) -> None:
        """A check cut short by its caller's deadline: let it finish within its full timeout,
        then reuse the worker (or replace it when it ran past that)."""
        if worker.read_line(hard_deadline) is None:
            self._replace(worker)
        else:
            self._idle.put(worker)

    def check(self, predicted: str, reference: str, timeout_s: float) -> bool | None:
        """math-verify equivalence within `timeout_s` in all (waiting included): True/False, None
        when the check itself timed out or crashed (the worker is replaced), or `VerifierBusy`
        raised when waiting for a worker left no time for a verdict."""
        start = time.monotonic()
        deadline = start + timeout_s
        try:
            worker, waited = self._idle.get_nowait(), False
        except queue.Empty:
            with self._lock:
                if not self._all:
                    raise RuntimeError("no verifier workers: their replacements failed to start") from None
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                worker = None
            waited = True
            wait_s = time.monotonic() - start
            with self._lock:
                self.waits += 1
                self.wait_s_total += wait_s
                self.wait_s_max = max(self.wait_s_max, wait_s)
                if worker is None:
                    self.busy += 1
            if worker is None:
                raise VerifierBusy(f"no free verifier worker within {timeout_s:g}s")
        with self._lock:
            self.calls += 1
        sent_at = time.monotonic()
        # the worker gets the same limits as on an idle pool, so every verdict it returns is one
        # a call without waiting would have returned too
        line = worker.read_line(deadline) if worker.send(predicted, reference, timeout_s) else None
        if line is not None:
            self._idle.put(worker)
            return bool(json.loads(line)["ok"])
        if waited and worker.process.poll() is None:
            with self._lock:
                self.busy += 1
                self.late += 1
            threading.Thread(target=self._finish_late, args=(worker, sent_at + timeout_s), daemon=True).start()
            raise VerifierBusy(f"the verifier check ran out of the {timeout_s:g}s left after waiting for a worker")
        self._replace(worker)
        return None

    def stats(self) -> dict:
        """{"pid": this process, "worker_pids": live workers (starting ones included), "idle":
        workers ready and free now, "calls": checks sent, "timeouts": checks that hit their full
        deadline or a crash (each one worker replaced), "started": workers started so far
        (num_workers plus one per timeout: none per call), "waits": calls that found every worker
        busy, "wait_s_total" / "wait_s_max": their seconds waiting, "busy": calls that ended
        without a verdict because waiting used up their time (scored wrong, not memoized), "late":
        those among them that got a worker but not the time to finish on it}."""
        with self._lock:
            return {
                "pid": os.getpid(),
                "worker_pids": sorted(worker.process.pid for worker in self._all),
                "idle": self._idle.qsize(),
                "calls": self.calls,
                "timeouts": self.timeouts,
                "started": self.started,
                "waits": self.waits,
                "wait_s_total": self.wait_s_total,
                "wait_s_max": self.wait_s_max,
                "busy": self.busy,
                "late": self.late,
            }

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = list(self._all), []
        for worker in workers:
            worker.kill()


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool (BRIDGE_VERIFIER_WORKERS workers, default 2), created on first use
    (in a forked child: on its first use there, see the module docstring)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = VerifierPool(int(os.environ.get("BRIDGE_VERIFIER_WORKERS", "2")))
        return _POOL


def default_pool_stats() -> dict:
    """`default_pool().stats()`: a module-level function, so another process can be asked for it."""
    return default_pool().stats()


def _close_default_pool() -> None:
    if _POOL is not None:
        _POOL.close()


def _forget_inherited_pool() -> None:
    """In a fork child: drop the parent's pool without touching its workers, and a lock that a
    parent thread may have held at the fork."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


atexit.register(_close_default_pool)  # reads the global at exit: a fork child closes only its own
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_pool)
