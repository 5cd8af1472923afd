"""Advantages and dense rewards: what each token is pushed by.

Sequence-level (sparse rewards, one per completion; groups are consecutive blocks of
`group_size` completions of the same prompt):
    group_advantages    A = (r - mean_g) / (std_g + eps)   GRPO (Shao et al. 2024), ddof=1 as verl/TRL
                        A = r - mean_g  (scale="none")      Dr. GRPO (Liu et al. 2025)
                        A = 0 where max_g - min_g <= spread_tol (groups equal within a tolerance)
    rloo_advantages     A_i = r_i - mean_{j != i} r_j      RLOO (Ahmadian et al. 2024)
Token-level (dense rewards from a teacher; logp arrays float[B, T]):
    opd_token_advantages      -coef (log p_S - log p_T)                 on-policy distillation
    exopd_token_advantages    lam (log p_T - log p_B) - (log p_S - log p_B)   reward extrapolation
    erpd_rewards              whiten(log p_pos - log p_neg)            ERPD stage 2
    ensemble_rewards          weighted mean of whitened signals
    gae                       generalized advantage estimation with a critic (Schulman et al.
                              2016), outcome reward on the last token; lambda per row allowed
                              (`length_adaptive_lambda`: VAPO, Yue et al. 2025)
    tip_token_weights         0/1 token selection, TIP (Xu et al. 2026), H = student entropy,
                              D = teacher-student divergence, quantiles over masked tokens:
        rule="entropy"   top round(keep_fraction * n) tokens by H
        rule="q3"        H < quantile(H, entropy_quantile) and D > quantile(D, divergence_quantile)
        rule="union"     entropy or q3 (default)
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


def group_advantages(rewards, group_size, scale="std", eps=1e-6, spread_tol=1e-3):
    """Group-normalized advantages (GRPO; Dr. GRPO with scale="none").

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)   scale="std", std unbiased (ddof=1)
        A_i =  r_i - mean_g(r)                       scale="none"
        A_i =  0                                     if max_g(r) - min_g(r) <= spread_tol

    spread_tol is an absolute tolerance in reward units (a Python float >= 0). A group whose
    rewards are equal within it carries no preference between its completions and gets
    exactly 0 (never NaN), for both scales and for group_size 1. Why a tolerance and not
    exact equality: rewards often have small per-sequence terms subtracted (a KL penalty of
    ~1e-5..1e-4), so an all-correct group is [1 - kl_1, ..., 1 - kl_G] with distinct values;
    dividing by its std rescales that noise to advantages of order 1, as large as a real
    correct/incorrect split. verl adds eps to the std and has this same problem (eps=1e-6 is
    far below such a spread). The default 1e-3 sits well above that noise and well below real
    reward differences (0/1 correctness, partial credit in steps of 0.1 or more); set it to 0
    to zero only exactly equal groups. A group whose spread exceeds the tolerance is
    normalized as usual, without any shrinkage.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"Unknown advantage scale {scale!r}; choose one of {GROUP_SCALES}.")
    if not spread_tol >= 0:
        raise ValueError(f"spread_tol must be >= 0 (got {spread_tol}).")
    groups = _grouped(rewards, group_size)
    centered = groups - jnp.mean(groups, axis=1, keepdims=True)
    if scale == "std":
        variance = jnp.sum(jnp.square(centered), axis=1, keepdims=True) / max(group_size - 1, 1)
        centered = centered / (jnp.sqrt(variance) + eps)
    spread = jnp.max(groups, axis=1, keepdims=True) - jnp.min(groups, axis=1, keepdims=True)
    return jnp.where(spread <= spread_tol, 0.0, centered).reshape(-1)


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


def terminal_rewards(rewards, mask):
    """float[B, T]: each row's outcome reward on its last completion token (mask true), 0 elsewhere."""
    mask = jnp.asarray(mask, bool)
    t = mask.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # the last true position of each row
    onehot = (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(mask, axis=1, keepdims=True)
    return jnp.where(onehot, jnp.asarray(rewards, jnp.float32)[:, None], 0.0)


def gae(token_rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation over completion tokens (Schulman et al. 2016, "High-
    dimensional continuous control using generalized advantage estimation").

        delta_t = r_t + gamma V_{t+1} - V_t        V beyond the last masked token = 0 (terminal)
        A_t     = sum_l (gamma lam)^l delta_{t+l}   (reverse scan, stopping at the mask's end)
        R_t     = A_t + V_t                          the critic's regression target

    token_rewards, values float[B, T] (values of the states before each token, from the
    hidden state that predicts it); mask bool[B, T], contiguous from position 0; lam a scalar
    or float[B] (per-row lambda). gamma = lam = 1 gives A_t = sum of future rewards - V_t.
    Returns (advantages, returns), 0 off the mask.
    """
    mask = jnp.asarray(mask, jnp.float32)
    values = jnp.asarray(values, jnp.float32) * mask
    rewards = jnp.asarray(token_rewards, jnp.float32) * mask
    decay = gamma * jnp.broadcast_to(jnp.asarray(lam, jnp.float32).reshape(-1, 1), (mask.shape[0], 1))[:, 0]
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * mask

    def back(carry, x):
        delta, m = x
        carry = (delta + decay * carry) * m
        return carry, carry

    _, adv = jax.lax.scan(back, jnp.zeros(mask.shape[0]), (deltas.T, mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def length_adaptive_lambda(lengths, alpha):
    """VAPO's per-sequence lambda = 1 - 1 / (alpha * length) (Yue et al. 2025, "VAPO"), so the
    bias-variance trade-off of GAE scales with the response length; floored at 0."""
    lengths = jnp.maximum(jnp.asarray(lengths, jnp.float32), 1.0)
    return jnp.maximum(1.0 - 1.0 / (alpha * lengths), 0.0)


TIP_RULES = ("entropy", "q3", "union")


def _top_fraction(score, mask, keep_fraction):
    """bool mask of the round(keep_fraction * n) highest-scoring masked entries (n = masked
    count; at least one when n > 0); ties go to the earlier position in row-major order."""
    count = jnp.sum(mask)
    order = jnp.argsort(-jnp.where(mask, score, -jnp.inf).reshape(-1), stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size))
    keep_count = jnp.maximum(jnp.floor(keep_fraction * count + 0.5), jnp.minimum(count, 1))
    return (rank < keep_count).reshape(mask.shape) & mask


def _masked_quantile(values, mask, q):
    """The q-quantile of values over masked entries (NumPy's default linear interpolation);
    NaN when nothing is masked, so every comparison against it is False."""
    return jnp.nanquantile(jnp.where(mask, values, jnp.nan).reshape(-1), q)


def tip_token_weights(student_entropy, divergence, mask, rule="union", keep_fraction=0.5,
                      entropy_quantile=0.5, divergence_quantile=0.5):
    """Token selection for on-policy distillation, TIP (Xu et al. 2026, "TIP: Token Importance
    in On-Policy Distillation", arXiv:2604.14084): float32 0/1 weights [B, T].

    H = student entropy, D = teacher-student divergence per token (float[B, T]; higher = more
    divergent, used as given, e.g. the sampled-token log p_S - log p_T or a full-vocab KL).
    The paper finds informative tokens in two regions: high student entropy (the student is
    unsure), and low entropy with high divergence ("Q3": the student is confident and the
    teacher disagrees, i.e. overconfident and wrong), which entropy-only selection misses.

        rule="entropy"  keep the round(keep_fraction * n) masked tokens with the highest H
                        (n = number of masked tokens in the batch; at least one when n > 0;
                        ties go to the earlier position, row-major)
        rule="q3"       keep masked t with  H_t < quantile_m(H, entropy_quantile)
                                       and  D_t > quantile_m(D, divergence_quantile)
        rule="union"    keep t if either rule keeps it (default)

    quantile_m is over the masked tokens of the whole batch only (NumPy's default linear
    interpolation); both bounds are strict, so a token exactly at a threshold is not in Q3,
    and a batch whose masked entropies are all equal has no Q3 tokens. keep_fraction is used
    by "entropy" and "union", the quantiles by "q3" and "union". Positions off the mask are
    always 0; an empty mask gives all zeros. The inputs are under stop_gradient. Jit-able
    with rule, keep_fraction and the quantiles static Python values and the arrays traced.
    """
    if rule not in TIP_RULES:
        raise ValueError(f"Unknown TIP rule {rule!r}; choose one of {TIP_RULES}.")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1] (got {keep_fraction}).")
    for label, q in (("entropy_quantile", entropy_quantile), ("divergence_quantile", divergence_quantile)):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{label} must be in [0, 1] (got {q}).")
    entropy_ = jax.lax.stop_gradient(jnp.asarray(student_entropy, jnp.float32))
    divergence = jax.lax.stop_gradient(jnp.asarray(divergence, jnp.float32))
    mask = jnp.broadcast_to(mask, entropy_.shape) != 0
    keep = jnp.zeros(mask.shape, bool)
    if rule in ("entropy", "union"):
        keep |= _top_fraction(entropy_, mask, keep_fraction)
    if rule in ("q3", "union"):
        low_entropy = entropy_ < _masked_quantile(entropy_, mask, entropy_quantile)
        high_divergence = divergence > _masked_quantile(divergence, mask, divergence_quantile)
        keep |= low_entropy & high_divergence & mask
    return keep.astype(jnp.float32)
