"""Advantages and dense rewards: what each token is pushed by.

Sequence-level (sparse rewards, one per completion; groups are consecutive blocks of
`group_size` completions of the same prompt):
    group_advantages    A = (r - mean_g) / (std_g + eps)   GRPO (Shao et al. 2024), ddof=1 as verl/TRL
                        A = r - mean_g  (scale="none")      Dr. GRPO (Liu et al. 2025)
    rloo_advantages     A_i = r_i - mean_{j != i} r_j      RLOO (Ahmadian et al. 2024)
Token-level (dense rewards from a teacher; logp arrays float[B, T]):
    opd_token_advantages      -coef (log p_S - log p_T)                 on-policy distillation
    exopd_token_advantages    lam (log p_T - log p_B) - (log p_S - log p_B)   reward extrapolation
    erpd_rewards              whiten(log p_pos - log p_neg)            ERPD stage 2
    ensemble_rewards          weighted mean of whitened signals
    tip_token_weights         keep the most important tokens (entropy x divergence)
Utilities: whiten (masked, unbiased variance, as verl's masked_whiten).

Everything is a pure jnp function; sequence-level results are float[N], token-level [B, T].
"""
import functools

import jax
import jax.numpy as jnp

from bridge.losses.aggregation import masked_values, safe_divide

GROUP_SCALES = ("std", "none")


def _grouped(rewards, group_size):
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size} "
            f"(got shape {rewards.shape}); lay out each prompt's completions consecutively."
        )
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        rewards = rewards.astype(jnp.float32)
    return rewards.reshape(-1, group_size)


def group_advantages(rewards, group_size, scale="std", eps=1e-6):
    """Group-normalized advantages (GRPO; Dr. GRPO with scale="none").

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)   scale="std", std unbiased (ddof=1)
        A_i =  r_i - mean_g(r)                       scale="none"

    A group whose rewards are all equal gets exactly 0 (never NaN), also for group_size 1.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"Unknown advantage scale {scale!r}; choose one of {GROUP_SCALES}.")
    groups = _grouped(rewards, group_size)
    centered = groups - jnp.mean(groups, axis=1, keepdims=True)
    if scale == "std":
        variance = jnp.sum(jnp.square(centered), axis=1, keepdims=True) / max(group_size - 1, 1)
        centered = centered / (jnp.sqrt(variance) + eps)
    constant = jnp.max(groups, axis=1, keepdims=True) == jnp.min(groups, axis=1, keepdims=True)
    return jnp.where(constant, 0.0, centered).reshape(-1)


def rloo_advantages(rewards, group_size):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024).

        A_i = r_i - (sum_g r - r_i) / (G - 1)  =  G / (G - 1) * (r_i - mean_g r)
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2 (got {group_size}).")
    groups = _grouped(rewards, group_size)
    others_mean = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


ADVANTAGE_ESTIMATORS = {
    "grpo": functools.partial(group_advantages, scale="std"),
    "drgrpo": functools.partial(group_advantages, scale="none"),
    "rloo": rloo_advantages,
}


def advantage_estimator(name):
    """The estimator `(rewards, group_size) -> advantages` named grpo, drgrpo or rloo."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"Unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}."
        )
    return ADVANTAGE_ESTIMATORS[name]


def whiten(values, mask, eps=1e-8):
    """Masked whitening over the whole batch (verl masked_whiten with shift_mean=True).

        mu  = sum(v m) / sum(m),  var = sum((v - mu)^2 m) / (sum(m) - 1)   (unbiased)
        out = (v - mu) * rsqrt(var + eps)  on the mask, 0 elsewhere

    With fewer than two masked entries the variance is taken as 0 (no NaN).
    """
    values = jnp.asarray(values)
    mask = jnp.broadcast_to(mask, values.shape)
    count = jnp.sum(mask.astype(values.dtype))
    mean = safe_divide(jnp.sum(masked_values(values, mask)), count)
    centered = masked_values(values - mean, mask)
    variance = safe_divide(jnp.sum(jnp.square(centered)), count - 1.0)
    variance = jnp.where(count > 1, variance, 0.0)
    return centered * jax.lax.rsqrt(variance + eps)


def opd_token_advantages(student_logp, teacher_logp, coef=1.0):
    """On-policy distillation dense reward (Agarwal et al. 2024; Thinking Machines OPD 2025).

        A_t = -coef * (log p_S(y_t) - log p_T(y_t))

    The per-token sampled reverse KL, negated; no discounting. Feed it to a policy loss as
    [B, T] advantages.
    """
    return -coef * (student_logp - teacher_logp)


def exopd_token_advantages(student_old_logp, teacher_logp, base_logp, lam=1.25):
    """Reward-extrapolated OPD (G-OPD / ExOPD).

        A_t = lam * (log p_T - log p_base) - (log p_S_old - log p_base)

    lam = 1 recovers plain OPD (log p_T - log p_S_old); lam > 1 extrapolates the
    teacher's improvement over the base model beyond the teacher.
    """
    return lam * (teacher_logp - base_logp) - (student_old_logp - base_logp)


def erpd_rewards(positive_logp, negative_logp, mask):
    """ERPD stage-2 dense rewards: whiten(log p_pos - log p_neg, mask).

    Strategy 1: positive = teacher after many off-policy updates, negative = the fixed
    rollout policy. Strategy 2: negative = an early "unlearned" checkpoint. Strategy 3:
    positive = current/reference policy, negative = a weak policy (push away from it).
    """
    return whiten(positive_logp - negative_logp, mask)


def ensemble_rewards(list_of_rewards, weights=None, mask=None):
    """Weighted mean of whitened reward signals: sum_i w_i whiten(r_i, mask) / sum_i w_i.

    weights default to uniform; mask defaults to every entry (then signals that are
    already whitened under a mask, e.g. from erpd_rewards, should pass that mask too).
    """
    signals = [jnp.asarray(r) for r in list_of_rewards]
    if not signals:
        raise ValueError("ensemble_rewards needs at least one reward signal.")
    if weights is None:
        weights = [1.0] * len(signals)
    if len(weights) != len(signals):
        raise ValueError(f"Got {len(weights)} weights for {len(signals)} reward signals.")
    if mask is None:
        mask = jnp.ones(signals[0].shape, bool)
    weights = jnp.asarray(weights, jnp.float32)
    whitened = jnp.stack([whiten(r, mask) for r in signals])
    return jnp.tensordot(weights / jnp.sum(weights), whitened, axes=1)


def tip_token_weights(student_entropy, divergence, mask, alpha=1.0, gamma=1.0, keep_fraction=0.5):
    """Token-importance selection for distillation (TIP-style): 0/1 weights [B, T].

        score_t = (H_t / mean_m H)^alpha * (max(D_t, 0) / mean_m D)^gamma

    H = student entropy, D = teacher-student divergence per token, means over masked
    tokens. Keeps the round(keep_fraction * n) highest-scoring masked tokens of the batch
    (at least one when any token is masked; ties go to the earlier position). The
    selection is invariant to rescaling H or D; the normalization keeps powers in range.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1] (got {keep_fraction}).")
    entropy_ = jax.lax.stop_gradient(jnp.asarray(student_entropy, jnp.float32))
    divergence = jnp.maximum(jax.lax.stop_gradient(jnp.asarray(divergence, jnp.float32)), 0.0)
    mask = jnp.broadcast_to(mask, entropy_.shape) != 0
    count = jnp.sum(mask)
    norm_entropy = safe_divide(entropy_, safe_divide(jnp.sum(jnp.where(mask, entropy_, 0)), count))
    norm_divergence = safe_divide(divergence, safe_divide(jnp.sum(jnp.where(mask, divergence, 0)), count))
    score = jnp.power(norm_entropy, alpha) * jnp.power(norm_divergence, gamma)
    score = jnp.where(mask, score, -jnp.inf).reshape(-1)
    order = jnp.argsort(-score, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size))
    keep_count = jnp.maximum(jnp.floor(keep_fraction * count + 0.5), jnp.minimum(count, 1))
    keep = (rank < keep_count).reshape(mask.shape) & mask
    return keep.astype(jnp.float32)
