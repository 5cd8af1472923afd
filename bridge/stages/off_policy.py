"""Rollouts one step off policy, and rollouts and training on separate sub-meshes (rl stage).

`off_policy_lag=1` (default 0: strictly on policy) is verl's one-step-off-policy schedule
(NeMo-RL's async GRPO with max_trajectory_age_steps=1): the batch step t trains on was sampled
with the weights theta_{t-1}, and step t+1's batch is sampled with theta_t while step t's
updates run,

    step t:  B_t (sampled in step t-1; in the first step of a run or of a resume, sampled now
             with theta_t) -> old logprobs of B_t from the trainer at theta_t -> copy theta_t
             to the rollout mesh -> dispatch the updates theta_t -> theta_{t+1} (JAX returns at
             once) -> sample B_{t+1} with the copy, run the verifier -> wait for the updates

Correction for the lag: the trainer recomputes the old logprobs at theta_t (the proximal
policy the PPO ratio is clipped against), and `tis_cap` > 0 multiplies each token's advantage
by the truncated behaviour weight, the decoupled PPO objective of AReaL (Fu et al. 2025):

    L = -E_{y ~ pi_{theta_{t-1}}} [ min(pi_{theta_t}(y_k) / pi_{theta_{t-1}}(y_k), C)
                                    * clip-objective(pi_theta(y_k) / pi_{theta_t}(y_k), A) ]

with pi_{theta_{t-1}} the sampler's own logprob (so the weight also covers sampler/trainer
mismatch, `common.tis_weight`), C = tis_cap. tis_cap = 0 keeps weight 1: verl's default
one-step-off (PPO against the recomputed old policy, the lag's bias left uncorrected).

`rollout_devices=k` (default 0: one shared mesh) samples on the first k devices and trains on
the rest, each a mesh of `config.mesh.shape` (its -1 filled for that part); the policy's
weights are copied onto the rollout mesh after each update (`jax.device_put`). With lag 0 the
step samples on the rollout mesh and then trains, in turn; with lag 1 the two overlap. On one
shared mesh lag 1 overlaps only host work (the verifier, batch assembly) with device work.
"""

from __future__ import annotations

import dataclasses
import time

import jax
from flax import nnx

from bridge import mesh as mesh_lib, sharding
from bridge.stages import common


def contexts(ctx, scfg, stage: str):
    """(training context, rollout context): `ctx` itself for both without `rollout_devices`,
    else copies of it whose mesh is the training or the rollout sub-mesh."""
    lag, k = int(scfg.get("off_policy_lag", 0)), int(scfg.get("rollout_devices", 0))
    if lag not in (0, 1):
        raise ValueError(f"Stage {stage!r}: off_policy_lag must be 0 (on policy) or 1 (one step off); got {lag}.")
    if not k:
        return ctx, ctx
    devices = list(ctx.mesh.devices.flat)
    if not 0 < k < len(devices):
        raise ValueError(f"Stage {stage!r}: rollout_devices={k} must leave devices to train on; the mesh has "
                         f"{len(devices)}.")
    try:
        rollout, train = mesh_lib.split_mesh(tuple(ctx.cfg.mesh.shape), k, devices)
    except ValueError as error:
        raise ValueError(f"Stage {stage!r}: rollout_devices={k}: {error} Give mesh.shape a -1.") from error
    return dataclasses.replace(ctx, mesh=train), dataclasses.replace(ctx, mesh=rollout)


def policy_copy(model, ctx):
    """A copy of `model` on `ctx.mesh`, sharded by its logical axes: new buffers even on the
    mesh it is on, so an update that donates the trainer's state leaves the copy intact."""
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, ctx.mesh, ctx.rules)
    return nnx.merge(graphdef, jax.device_put(state, shardings, may_alias=False))


def dispatch_updates(trainer, state, batch: dict, **kw):
    """`common.dispatch_updates` (no frozen models) whose finish() also reports update_wait_s,
    how long the step still waited for its updates after the work it overlapped them with."""
    state, finish = common.dispatch_updates(trainer, state, batch, None, **kw)

    def timed() -> dict:
        waited = time.perf_counter()
        metrics = finish()
        metrics["update_wait_s"] = time.perf_counter() - waited
        return metrics

    return state, timed


class Lookahead:
    """A stage's prompt stream with the rollout sampled one step ahead: `ahead(step, sample)`
    keeps sample()'s rollout for `step`, `take(step)` hands it over (None when there is none:
    the first step of a run or of a resume). get_state() is the stream's state before the
    rollout kept ahead was drawn, so a resumed run draws that rollout's prompts again (and
    samples them with the restored weights)."""

    def __init__(self, data):
        self.data, self.pending, self.before = data, {}, None

    def __next__(self):
        return next(self.data)

    def ahead(self, step: int, sample) -> None:
        self.before = self.data.get_state()
        self.pending = {step: sample()}

    def take(self, step: int):
        self.before = None
        return self.pending.pop(step, None)

    def get_state(self):
        return self.data.get_state() if self.before is None else self.before

    def set_state(self, state) -> None:
        self.pending, self.before = {}, None
        self.data.set_state(state)
