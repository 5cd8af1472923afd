"""The critic's loss: PPO's clipped value regression (Schulman et al. 2017; as in verl and
OpenAI's baselines).

    L_V = 1/2 * masked_mean( max( (V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2 ) )

V the critic's values [B, T], V_old those at rollout time, R the GAE returns. c <= 0: the
plain squared error 1/2 (V - R)^2.
"""
import jax.numpy as jnp

from bridge.losses.aggregation import masked_mean


def clipped_value_loss(values, old_values, returns, mask, clip=0.2):
    """(loss, metrics) of the formula above; metrics: value_clip_frac (tokens where the
    clipped term is the larger) and value_mean."""
    values = values.astype(jnp.float32)
    plain = jnp.square(values - returns)
    if clip <= 0:
        return 0.5 * masked_mean(plain, mask), {"value_mean": masked_mean(values, mask)}
    clipped = jnp.square(old_values + jnp.clip(values - old_values, -clip, clip) - returns)
    loss = 0.5 * masked_mean(jnp.maximum(plain, clipped), mask)
    return loss, {"value_clip_frac": masked_mean(clipped > plain, mask), "value_mean": masked_mean(values, mask)}
