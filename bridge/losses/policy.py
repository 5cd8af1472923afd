"""Policy-gradient surrogates on per-token log-probabilities of sampled tokens.

Shapes: logp, old_logp float[B, T] (current and sampling policy), mask bool/float[B, T]
(1 on completion tokens), advantages float[B] (broadcast over T) or float[B, T].
Every loss returns (scalar loss, metrics) where metrics are float32 scalars averaged over
masked tokens (token-mean, whatever the loss aggregation) and include "loss".

Advantages are constants of the surrogate: they pass through stop_gradient, so a caller
may compute them from the same logp (e.g. on-policy distillation) without extra terms.

Importance ratio rho = exp(logp - old_logp). The log-ratio is set to 0 on masked-out
tokens (padding may hold any value) and clamped to +-LOG_RATIO_CLAMP before the exp,
as verl does; within the clamp (rho in [2e-9, 4.9e8]) values and gradients are exact.
"""
import jax
import jax.numpy as jnp

from bridge.losses.aggregation import aggregate, masked_mean

LOG_RATIO_CLAMP = 20.0


def _masked_log_ratio(logp, old_logp, mask):
    """logp - old_logp on completion tokens, 0 elsewhere, clamped for a finite exp."""
    mask = jnp.broadcast_to(mask, logp.shape)
    log_ratio = jnp.where(mask != 0, logp - old_logp, jnp.zeros_like(logp))
    return jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _per_token_advantages(advantages, logp):
    """[B] -> [B, 1] (broadcast over time); [B, T] unchanged; always a constant."""
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, logp.dtype))
    if advantages.ndim == logp.ndim - 1:
        advantages = advantages[..., None]
    return jnp.broadcast_to(advantages, logp.shape)


def _f32(x):
    return jax.lax.stop_gradient(x).astype(jnp.float32)


def _ratio_metrics(log_ratio, mask):
    """Mean ratio and Schulman's k3 estimate of KL(old || new) = E_old[rho - 1 - log rho]."""
    ratio = jnp.exp(log_ratio)
    return {
        "ratio_mean": _f32(masked_mean(ratio, mask)),
        "approx_kl": _f32(masked_mean(ratio - 1.0 - log_ratio, mask)),
    }


def clipped_surrogate(
    logp,
    old_logp,
    advantages,
    mask,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    aggregation="token-mean",
    max_len=None,
):
    """PPO clipped surrogate (Schulman et al. 2017), as used by GRPO (Shao et al. 2024).

        l_t = -min(rho_t * A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) * A_t)

    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025: 0.2 / 0.28).
    dual_clip = c > 1 bounds the loss of negative-advantage tokens (Ye et al. 2020,
    "Mastering Complex Control in MOBA Games"; verl's clip_ratio_c = 3):
        l_t = min(l_t, -c * A_t)  where A_t < 0.

    Metrics: clip_frac_low / clip_frac_high are the fractions of tokens whose clip binds
    (rho < 1 - clip_low with A < 0, rho > 1 + clip_high with A > 0: zero gradient there);
    dual_clip_frac when dual_clip is set; ratio_mean; approx_kl (k3 of KL(old || new)).
    """
    log_ratio = _masked_log_ratio(logp, old_logp, mask)
    adv = _per_token_advantages(advantages, logp)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    metrics = {
        "clip_frac_low": _f32(masked_mean((ratio < 1.0 - clip_low) & (adv < 0), mask)),
        "clip_frac_high": _f32(masked_mean((ratio > 1.0 + clip_high) & (adv > 0), mask)),
    }
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (got {dual_clip}); verl uses 3.0.")
        dual_bound = -adv * dual_clip
        metrics["dual_clip_frac"] = _f32(masked_mean((adv < 0) & (per_token > dual_bound), mask))
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, dual_bound), per_token)
    loss = aggregate(per_token, mask, aggregation, max_len)
    metrics.update(_ratio_metrics(log_ratio, mask))
    metrics["loss"] = _f32(loss)
    return loss, metrics


def gspo_loss(
    logp,
    old_logp,
    advantages,
    mask,
    clip_low=3e-4,
    clip_high=4e-4,
    aggregation="seq-mean-token-mean",
    max_len=None,
):
    """GSPO, token form (Zheng et al. 2025, "Group Sequence Policy Optimization").

        s_i  = exp( sum_t m_t (logp_t - old_logp_t) / sum_t m_t )        (sequence ratio)
        s_it = stop_grad(s_i) * exp(logp_t - stop_grad(logp_t))          (value s_i, grad s_i * dlogp_t)
        l_t  = -min(s_it * A_t, clip(s_it, 1 - clip_low, 1 + clip_high) * A_t)

    With per-sequence advantages and seq-mean-token-mean this is sequence-level GSPO:
    grad = -s_i A_i / |y_i| * sum_t grad logp_t where the clip does not bind, else 0.
    Clip fractions count tokens whose sequence ratio is clipped (sign as in PPO).
    """
    mask = jnp.broadcast_to(mask, logp.shape)
    weights = mask.astype(logp.dtype)
    token_log_ratio = jnp.where(mask != 0, logp - old_logp, jnp.zeros_like(logp))
    lengths = jnp.sum(weights, axis=-1, keepdims=True)
    seq_log_ratio = jnp.sum(token_log_ratio * weights, axis=-1, keepdims=True)
    seq_log_ratio = jnp.where(lengths > 0, seq_log_ratio / jnp.where(lengths > 0, lengths, 1), 0)
    seq_log_ratio = jnp.clip(jax.lax.stop_gradient(seq_log_ratio), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_s = seq_log_ratio + logp - jax.lax.stop_gradient(logp)
    log_s = jnp.where(mask != 0, log_s, jnp.zeros_like(log_s))
    s = jnp.exp(log_s)
    adv = _per_token_advantages(advantages, logp)
    per_token = jnp.maximum(-adv * s, -adv * jnp.clip(s, 1.0 - clip_low, 1.0 + clip_high))
    loss = aggregate(per_token, mask, aggregation, max_len)
    metrics = {
        "clip_frac_low": _f32(masked_mean((s < 1.0 - clip_low) & (adv < 0), mask)),
        "clip_frac_high": _f32(masked_mean((s > 1.0 + clip_high) & (adv > 0), mask)),
        "loss": _f32(loss),
    }
    metrics.update(_ratio_metrics(_masked_log_ratio(logp, old_logp, mask), mask))
    return loss, metrics


def sapo_loss(
    logp,
    old_logp,
    advantages,
    mask,
    tau_pos=1.0,
    tau_neg=1.05,
    aggregation="token-mean",
    max_len=None,
):
    """SAPO soft-gated surrogate (Gao et al. 2025, "Soft Adaptive Policy Optimization").

        f(rho) = (4 / tau) * sigmoid(tau * (rho - 1)),  tau = tau_pos if A > 0 else tau_neg
        l_t    = -f(rho_t) * A_t

    df/drho = 4 sigmoid(1 - sigmoid) equals 1 at rho = 1 and decays smoothly away from
    it, replacing the hard clip. Metric gate_mean is the mean of that gradient weight.
    """
    log_ratio = _masked_log_ratio(logp, old_logp, mask)
    adv = _per_token_advantages(advantages, logp)
    ratio = jnp.exp(log_ratio)
    tau = jnp.where(adv > 0, tau_pos, tau_neg).astype(logp.dtype)
    gate = jax.nn.sigmoid(tau * (ratio - 1.0))
    per_token = -(4.0 / tau) * gate * adv
    loss = aggregate(per_token, mask, aggregation, max_len)
    metrics = {"gate_mean": _f32(masked_mean(4.0 * gate * (1.0 - gate), mask)), "loss": _f32(loss)}
    metrics.update(_ratio_metrics(log_ratio, mask))
    return loss, metrics


def cispo_loss(
    logp,
    old_logp,
    advantages,
    mask,
    clip_high,
    aggregation="token-mean",
    max_len=None,
):
    """CISPO (MiniMax-M1, 2025): REINFORCE with a truncated, stop-gradient IS weight.

        l_t = -stop_grad(min(rho_t, 1 + clip_high)) * A_t * logp_t

    Every token keeps its gradient (no clipped-away tokens); only the weight is truncated.
    grad l_t / d logp_t = -min(rho_t, 1 + clip_high) * A_t. clip_frac_high counts
    tokens whose weight is truncated (either sign of A).
    """
    log_ratio = _masked_log_ratio(logp, old_logp, mask)
    adv = _per_token_advantages(advantages, logp)
    ratio = jnp.exp(log_ratio)
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + clip_high))
    per_token = -weight * adv * logp
    loss = aggregate(per_token, mask, aggregation, max_len)
    metrics = {"clip_frac_high": _f32(masked_mean(ratio > 1.0 + clip_high, mask)), "loss": _f32(loss)}
    metrics.update(_ratio_metrics(log_ratio, mask))
    return loss, metrics
