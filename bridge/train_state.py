"""Explicit training state and the jitted update step every stage shares.

    state' = state            if loss or any gradient is non-finite (skipped, counted)
             state            if the batch has no weight (every row dropped: a no-op, reported)
             optax_update     otherwise

A stage supplies `loss_fn(model, batch, frozen) -> (loss, metrics)`; `frozen` carries the
states of models that score but do not train (teacher, reference), passed as arguments so
they are never baked into the compiled step as constants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bridge import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32[]: optimizer updates applied
    params: Any  # nnx.State of the trained model
    opt_state: Any
    skipped: jax.Array  # int32[]: consecutive updates skipped for non-finite loss or gradients


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a linear-warmup then constant/cosine schedule.

    cfg: lr, warmup_steps, schedule ("constant" | "cosine"), total_steps, b1, b2,
    weight_decay, grad_clip (0 = off).
    """
    warmup = int(cfg.get("warmup_steps", 0))
    total = max(int(cfg.get("total_steps", 1)), warmup + 1)
    if cfg.get("schedule", "constant") == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total)
    elif cfg.get("schedule", "constant") == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
                                   optax.constant_schedule(cfg.lr)], [warmup]) if warmup else cfg.lr
    else:
        raise ValueError(f"Unknown lr schedule {cfg.schedule!r}; use 'constant' or 'cosine'.")
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.get("grad_clip", 0) else []
    parts.append(optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                             weight_decay=cfg.get("weight_decay", 0.0)))
    return optax.chain(*parts)


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      skipped=jnp.zeros((), jnp.int32))


def state_shardings(state: TrainState, mesh, rules) -> TrainState:
    """Params by their logical axes; optax keeps the Param wrappers (and so the axes) on the
    moments, so the optimizer state shards like the params it belongs to."""
    repl = NamedSharding(mesh, P())
    return TrainState(step=repl, params=sharding_lib.state_shardings(state.params, mesh, rules),
                      opt_state=sharding_lib.state_shardings(state.opt_state, mesh, rules), skipped=repl)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def rows(batch) -> jax.Array:
    """Default micro-batch weight: its row count (exact for losses that average over rows)."""
    return jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)


def _normalized(weights: jax.Array) -> jax.Array:
    """w / sum(w); all zeros when every weight is 0 (an empty batch: loss and gradient 0)."""
    total = jnp.sum(weights)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def accumulate_gradients(objective: Callable, params, batch, microbatches: int, weight: Callable = rows):
    """((loss, metrics), grads) of `objective(params, batch)`, accumulated over micro-batches.

    The rows of every batch array are split into k = `microbatches` strided slices (slice m
    holds rows m, m+k, ...; with rows sharded over devices, every device keeps its share of
    each slice) and a `lax.scan` keeps one slice's activations alive at a time:

        L = sum_m (w_m / sum_j w_j) L_m,    grad L = sum_m (w_m / sum_j w_j) grad L_m

    with w_m = weight(slice m). Rows for row-averaged losses, the slice's token count for
    token-mean losses: then L and its gradient equal the whole batch's exactly (in exact
    arithmetic). Metrics are averaged with the same weights. When every w_m is 0 (no row
    counts) L and its gradient are 0, as for one pass over the empty batch.
    """
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if microbatches == 1:
        return grad_fn(params, batch)
    slices = sharding_lib.split_rows(batch, microbatches)
    weights = jax.vmap(weight)(slices)
    weights = _normalized(weights)

    def step(total, args):
        piece, w = args
        out = grad_fn(params, piece)
        return jax.tree.map(lambda t, x: t + w * x.astype(t.dtype), total, out), None

    zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], slices))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)), zeros)
    total, _ = jax.lax.scan(step, zeros, (slices, weights))
    return total


def make_update_step(graphdef, loss_fn: Callable, tx: optax.GradientTransformation, *,
                     state_sharding=None, microbatches: int = 1, microbatch_weight: Callable = rows):
    """jit((state, batch, frozen) -> (state, metrics)) with the state donated.

    metrics gain "loss", "grad_norm", "update_skipped" (1.0 when this update was dropped for
    a non-finite loss or gradient) and "update_empty" (1.0 when `microbatch_weight` of the
    whole batch is 0, e.g. every group dropped by DAPO's filter: params, optimizer moments and
    the step count stay as they are, whatever the micro-batch count). microbatches > 1
    accumulates the gradient over slices of the batch (`accumulate_gradients`), trading steps
    for activation memory.
    """
    def step(state: TrainState, batch, frozen):
        def objective(params, batch):
            return loss_fn(nnx.merge(graphdef, params), batch, frozen)

        (loss, metrics), grads = accumulate_gradients(objective, state.params, batch, microbatches,
                                                      microbatch_weight)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        empty = microbatch_weight(batch) <= 0
        apply_update = finite & ~empty

        def apply(operands):
            params, opt_state = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(apply_update, apply, lambda operands: operands,
                                         (state.params, state.opt_state))
        new_state = TrainState(
            step=state.step + apply_update.astype(jnp.int32),
            params=params,
            opt_state=opt_state,
            skipped=jnp.where(finite, 0, state.skipped + 1),
        )
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       update_skipped=1.0 - finite.astype(jnp.float32), update_empty=empty.astype(jnp.float32))
        return new_state, metrics

    out_shardings = None if state_sharding is None else (state_sharding, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)
