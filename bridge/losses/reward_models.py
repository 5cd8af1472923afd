"""Implicit reward models: the reward is beta * log(pi / ref), summed over a response.

Shapes: logp, ref_logp float[B, T]; mask bool/float[B, T]; labels / rewards float[B].
Losses return (scalar, metrics) with float32 scalar metrics.
"""
import jax
import jax.numpy as jnp

from bridge.losses.aggregation import masked_values


def implicit_token_rewards(logp, ref_logp, mask, beta=0.05):
    """Per-token implicit process rewards r_t = beta * (logp_t - ref_logp_t), 0 off the mask.

    Implicit PRM (Yuan et al. 2024, "Free Process Rewards without Process Labels"; PRIME,
    Cui et al. 2025): training the outcome reward beta * sum_t log(pi/ref) yields these
    dense per-token rewards for free.
    """
    return masked_values(beta * (logp - ref_logp), mask)


def implicit_prm_ce_loss(logp, ref_logp, mask, labels, beta=0.05, *, return_token_rewards=False):
    """Cross-entropy loss of the implicit PRM (Yuan et al. 2024; PRIME, Cui et al. 2025).

        r_bt = beta * m_bt (logp_bt - ref_logp_bt)          per-token implicit rewards
        z_b  = sum_t r_bt
        loss = mean_b [ softplus(z_b) - y_b * z_b ]  = BCE(sigmoid(z_b), y_b),  y_b in {0, 1}

    Metrics: loss, accuracy (sign of z_b agrees with y_b), reward_mean (mean z_b).
    Returns (loss, metrics); with ``return_token_rewards=True`` (a Python bool) returns
    (loss, metrics, token_rewards): the float[B, T] r_bt from the same forward pass (0 off
    the mask, differentiable), the dense process rewards PRIME feeds the policy. They are
    a third output, not a metric, because metrics are scalars averaged over micro-batches.
    """
    token_rewards = implicit_token_rewards(logp, ref_logp, mask, beta)
    z = jnp.sum(token_rewards, axis=-1)
    labels = jax.lax.stop_gradient(jnp.asarray(labels, z.dtype))
    loss = jnp.mean(jax.nn.softplus(z) - labels * z)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(((z > 0) == (labels > 0.5)).astype(z.dtype)),
        "reward_mean": jnp.mean(z),
    }
    metrics = {k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in metrics.items()}
    return (loss, metrics, token_rewards) if return_token_rewards else (loss, metrics)


def mse_reward_loss(logp, ref_logp, mask, rewards, beta):
    """Regress the implicit sequence reward onto an observed reward.

        loss = mean_b ( beta * sum_t m_t (logp_t - ref_logp_t) - r_b )^2

    Metrics: loss, reward_mean (mean predicted beta * sum_t log(pi/ref)).
    """
    z = jnp.sum(implicit_token_rewards(logp, ref_logp, mask, beta), axis=-1)
    rewards = jax.lax.stop_gradient(jnp.asarray(rewards, z.dtype))
    loss = jnp.mean(jnp.square(z - rewards))
    metrics = {"loss": loss, "reward_mean": jnp.mean(z)}
    return loss, {k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in metrics.items()}
