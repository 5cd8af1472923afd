"""Per-stage orbax checkpoints: train state (params, optimizer, counters) plus JSON metadata
(data-iterator state, rng seed, pipeline cursor, config fingerprint).

Layout: <workdir>/checkpoints/<stage>/<step>/{state,meta}. Orbax writes each step to a
temporary folder and renames it when complete, so a kill mid-save leaves the previous step
intact; Ctrl-C during a save or restore takes effect when it is done (orbax's threads cut off
midway print tracebacks at exit). A checkpoint that cannot be restored into the current model
stops the run with a message; nothing is ever deleted or overwritten to start fresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but does not fit this run."""


def fingerprint(obj) -> str:
    """Stable short hash of a JSON-able object (config subtree, model shapes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT inside the block is delivered when it ends (main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(*received[-1])


class StageCheckpoints:
    """Checkpoints of one stage: keep the last `keep`, save every `every` steps and at the end."""

    def __init__(self, workdir: str, stage: str, *, keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints", stage))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        with _interrupts_deferred():
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state, expected_meta: dict):
        """Restores (state, meta); raises CheckpointError naming what does not match.
        `expected_meta`: key -> its value, or a set of accepted values (a stage config changed
        on resume with --allow_changed is accepted in its recorded earlier versions)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            if hasattr(x, "shape") else x, abstract_state)
        where = os.path.join(self.directory, str(step))
        try:
            with _interrupts_deferred():
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as error:  # orbax raises many types for corrupt or foreign files
            raise CheckpointError(
                f"Cannot restore the checkpoint at {where}: {type(error).__name__}: {str(error)[:500]}\n"
                "It is corrupted or was written by a different model/config. Nothing was changed: "
                "use a new --workdir, or move that checkpoint away to start the stage over.") from error
        meta = dict(restored["meta"])
        for key, want in expected_meta.items():
            if meta.get(key) not in (want if isinstance(want, (set, frozenset)) else [want]):
                raise CheckpointError(
                    f"The checkpoint at {where} was written with a different {key} "
                    f"({meta.get(key)!r} vs {want!r} now). Nothing was changed: resume with the "
                    "same config, or use a new --workdir.")
        return restored["state"], meta
