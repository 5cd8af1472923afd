"""Frozen models in host memory between uses (config `system.frozen_on_host`).

A stage's frozen models (teachers, the KL reference, ERPD's scored models, proxy-tuning's
expert and anti-expert) score but never train. With the option on they are kept in pinned host
memory (each array's sharding with memory_kind="pinned_host": the same layout over the mesh)
and copied to device memory for the step that uses them; the step drops its device copy when
it ends. That frees their device memory while other programs run (sampling, the update of a
stage that scores them outside it), for one host-to-device copy of each frozen model per use.
The copy is made before the jitted program is called, so every program compiles as it does
with the option off (device-memory arguments) and computes the same values.

    park(ctx, m)    on: a module's parameters moved to host memory in place (a model cached
                    as a slot frees its device copy too); a state (tree of arrays) copied there
    fetch(tree)     every array in device memory (a copy of one parked on the host; an array
                    already in device memory is returned as it is)

Off, `park` returns its argument and `fetch` finds nothing to move: no change at all. Readers
of a parked slot in later stages (the sampler, the evaluation, a trainer, `fetch` at a use
site) place its parameters in device memory themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

HOST = "pinned_host"
DEVICE = "device"


def enabled(ctx) -> bool:
    """Whether the run keeps frozen models in host memory (`system.frozen_on_host`)."""
    return bool((ctx.cfg.get("system") or {}).get("frozen_on_host", False))


def _moved(tree, kind: str):
    """`tree` with every jax.Array not in memory `kind` copied there (same sharding otherwise)."""
    def one(x):
        if isinstance(x, jax.Array) and x.sharding.memory_kind != kind:
            return jax.device_put(x, x.sharding.with_memory_kind(kind))
        return x
    return jax.tree.map(one, tree)


def park(ctx, frozen):
    """Frozen weights as kept between uses: off, `frozen` unchanged; on, an `nnx.Module`'s
    parameters moved to pinned host memory in place (the module is returned), or a state (a
    tree of arrays) returned as a copy in host memory."""
    if not enabled(ctx):
        return frozen
    if isinstance(frozen, nnx.Module):
        nnx.update(frozen, _moved(nnx.state(frozen), HOST))
        return frozen
    return _moved(frozen, HOST)


def frozen_copy(ctx, state):
    """A frozen state the stage owns, safe from the trainer donating the buffers it was made
    from: a copy in device memory, or, with the option on, in host memory (`park`)."""
    return park(ctx, state) if enabled(ctx) else jax.tree.map(jnp.copy, state)


def fetch(tree):
    """`tree` for one use: every array in device memory (parked ones copied there, the rest as
    they are). With the option off nothing is parked, so `tree`'s arrays come back unchanged."""
    return _moved(tree, DEVICE)
