"""Persistent worker processes with a hard per-call timeout for slow answer checkers.

`VerifierPool.check(predicted, reference, timeout_s)` sends one comparison to an idle worker
(`verifier_worker.py`, a long-lived subprocess) and waits with `select` on its stdout, so the
timeout needs no signals and works from any thread. A worker that misses the deadline or dies is
killed and replaced by a fresh one (started at once, its imports overlap the caller's next work);
callers block only while every worker is busy. No process is created per call.

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
        self.ready = False

    def read_line(self, deadline: float) -> bytes | None:
        """The next output line, or None at the deadline or when the worker died."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

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
        self.calls = 0
        self.timeouts = 0
        self.started = 0
        for _ in range(num_workers):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        worker = _Worker()
        with self._lock:
            self._all.append(worker)
            self.started += 1
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        with self._lock:
            self._all.remove(worker)
            self.timeouts += 1
        return self._start()

    def check(self, predicted: str, reference: str, timeout_s: float) -> bool | None:
        """math-verify equivalence; None when the worker timed out or crashed (it is replaced)."""
        worker = self._idle.get()
        with self._lock:
            self.calls += 1
        try:
            if not worker.ready:
                if worker.read_line(time.monotonic() + STARTUP_TIMEOUT_S) != b"ready":
                    raise RuntimeError("verifier worker failed to start (is math-verify installed?)")
                worker.ready = True
            request = json.dumps({"p": predicted, "r": reference, "t": timeout_s}) + "\n"
            try:
                worker.process.stdin.write(request.encode())
                worker.process.stdin.flush()
                line = worker.read_line(time.monotonic() + timeout_s)
            except (BrokenPipeError, OSError):
                line = None
            if line is None:
                worker = self._replace(worker)
                return None
            return bool(json.loads(line)["ok"])
        finally:
            self._idle.put(worker)

    def stats(self) -> dict:
        """{"pid": this process, "worker_pids": live workers, "calls": checks sent, "timeouts":
        checks that hit the deadline or a crash, "started": workers started so far (num_workers
        plus one per timeout: none per call)}."""
        with self._lock:
            return {
                "pid": os.getpid(),
                "worker_pids": sorted(worker.process.pid for worker in self._all),
                "calls": self.calls,
                "timeouts": self.timeouts,
                "started": self.started,
            }

    def close(self) -> None:
        with self._lock:
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
