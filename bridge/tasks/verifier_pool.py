"""Persistent worker processes with a hard per-call timeout for slow answer checkers.

`VerifierPool.check(predicted, reference, timeout_s)` sends one comparison to an idle worker
(`verifier_worker.py`, a long-lived subprocess) and waits with `select` on its stdout, so the
timeout needs no signals and works from any thread. A worker that misses the deadline or dies is
killed and replaced by a fresh one (started at once, its imports overlap the caller's next work);
callers block only while every worker is busy. No process is created per call.
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
        self.timeouts = 0
        for _ in range(num_workers):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        worker = _Worker()
        with self._lock:
            self._all.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        with self._lock:
            self._all.remove(worker)
        return self._start()

    def check(self, predicted: str, reference: str, timeout_s: float) -> bool | None:
        """math-verify equivalence; None when the worker timed out or crashed (it is replaced)."""
        worker = self._idle.get()
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
                self.timeouts += 1
                worker = self._replace(worker)
                return None
            return bool(json.loads(line)["ok"])
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), []
        for worker in workers:
            worker.kill()


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool (BRIDGE_VERIFIER_WORKERS workers, default 2), created on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = VerifierPool(int(os.environ.get("BRIDGE_VERIFIER_WORKERS", "2")))
            atexit.register(_POOL.close)
        return _POOL
