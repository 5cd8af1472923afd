"""PPO's critic inside a stage: the value model, GAE advantages and the value loss term.

A stage that trains with a critic (rl with advantage="gae"; erpd_teacher with
teacher_loss="ppo") holds `models.value.ActorCritic(policy, critic)` in its TrainState and
exports the policy alone. Its `critic` sub-config:

    trunk         "shared": a scalar head on the policy's trunk | "separate": its own decoder
    init          the separate trunk's model reference ("" = a copy of the stage's policy)
    value_coef    weight of the value loss in the stage's loss
    value_clip    PPO's value clipping range (<= 0: unclipped)
    gamma, lam    GAE's discount and lambda for the policy's advantages
    lam_end       >= 0: lambda moves linearly from lam to lam_end over the stage's steps
    length_alpha  > 0: VAPO's length-adaptive lambda 1 - 1/(alpha * |y|) per row (replaces lam)
    value_lam     lambda of the critic's targets (VAPO's decoupled GAE: 1.0)
    whiten        whiten the advantages over the batch's tokens (as verl)

Per rollout batch: V_old from the critic, A = GAE(terminal reward, V_old; lam), R = GAE(...;
value_lam) + V_old, and the loss adds value_coef * L_V(V, V_old, R) (`losses.clipped_value_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge import advantages as adv_lib, losses, scoring
from bridge.models import value

TRUNKS = ("shared", "separate")


def check(name: str, ccfg) -> None:
    if ccfg.trunk not in TRUNKS:
        raise ValueError(f"Stage {name!r}: critic.trunk must be one of {TRUNKS}, not {ccfg.trunk!r}.")
    for key in ("gamma", "lam", "value_lam"):
        if not 0.0 <= float(ccfg[key]) <= 1.0:
            raise ValueError(f"Stage {name!r}: critic.{key}={ccfg[key]} is outside [0, 1].")


def trained_module(needs_critic):
    """A `StageKind.trained`: the policy with a critic when `needs_critic(scfg)`, else the policy."""
    def trained(scfg, policy, load):
        if not needs_critic(scfg):
            return policy
        if scfg.critic.trunk == "shared":
            return value.ActorCritic(policy)
        return value.ActorCritic(policy, load(scfg.critic.init) if scfg.critic.init else _copy(policy))
    return trained


def _copy(model):
    """A copy of the model with its own buffers (shapes-only models stay shapes-only)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, state))


def train_scores(module, batch, temperature: float, *, entropy: bool, critic: bool):
    """(logp, entropy or None, values or None) of the trained module on the batch, in one pass."""
    if critic:
        out = value.logprobs_and_values(module, batch, temperature, return_entropy=entropy)
        return (out[0], out[1], out[2]) if entropy else (out[0], None, out[1])
    if entropy:
        logp, ent = scoring.completion_logprobs(module, batch, temperature, return_entropy=True)
        return logp, ent, None
    return scoring.completion_logprobs(module, batch, temperature), None, None


def value_scorer(graphdef, slices: int):
    """jitted (params, batch) -> values [B, T] of the trained module, in `slices` row slices."""
    return jax.jit(scoring.in_slices(lambda state, batch: value.completion_values(nnx.merge(graphdef, state), batch),
                                     slices))


def lam_at(ccfg, step: int, total: int, lengths):
    """The policy's GAE lambda at `step` of `total`: per row (length-adaptive) or a scalar."""
    if ccfg.length_alpha > 0:
        return adv_lib.length_adaptive_lambda(lengths, float(ccfg.length_alpha))
    if ccfg.lam_end >= 0 and total > 1:
        return float(ccfg.lam) + (float(ccfg.lam_end) - float(ccfg.lam)) * step / (total - 1)
    return float(ccfg.lam)


def advantages(ccfg, rewards, values, mask, lengths, *, step: int, total: int):
    """(advantages [B, T], returns [B, T], metrics) from outcome rewards [B] and the critic's
    values [B, T] at rollout time (see the module docstring)."""
    mask = jnp.asarray(mask, jnp.float32)
    token_rewards = adv_lib.terminal_rewards(rewards, mask > 0)
    lam = lam_at(ccfg, step, total, lengths)
    adv, _ = adv_lib.gae(token_rewards, values, mask, float(ccfg.gamma), lam)
    _, returns = adv_lib.gae(token_rewards, values, mask, float(ccfg.gamma), float(ccfg.value_lam))
    if ccfg.whiten:
        adv = adv_lib.whiten(adv, mask > 0)
    metrics = {"gae_lambda": float(jnp.mean(jnp.asarray(lam))),
               "value_explained_variance": explained_variance(values, returns, mask)}
    return adv, returns, metrics


def value_term(ccfg, values, batch, mask):
    """(value_coef * L_V, metrics) for the loss: the clipped value regression on the batch's
    `old_values` and `returns`."""
    loss, metrics = losses.clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                              float(ccfg.value_clip))
    return float(ccfg.value_coef) * loss, {**metrics, "value_loss": loss}


def explained_variance(predicted, target, mask=None) -> float:
    """1 - Var(target - predicted) / Var(target) over masked entries (1: a perfect fit; <= 0:
    no better than the target's mean); 0 when the target is constant."""
    target, predicted = np.asarray(target, np.float64), np.asarray(predicted, np.float64)
    if mask is not None:
        keep = np.asarray(mask, np.float64) > 0
        target, predicted = target[keep], predicted[keep]
    return float(1.0 - (target - predicted).var() / target.var()) if target.size and target.var() > 0 else 0.0
