"""Teacher-student divergences per position over the full vocabulary (small-V forms).

Inputs are logits [..., V]; outputs are per-position values [...] (no reduction: aggregate
with `bridge.losses.aggregate`). `temperature` divides both logits before the softmax.
The teacher is always a constant (stop_gradient): gradients reach the student only.
Log-probabilities come from log_softmax, so |logits| ~ 1e4 stays finite.
The large-V streaming forms live in `bridge/kernels/logprobs` and must agree with these.

    forward_kl             KL(T || S) = sum_v p_T (log p_T - log p_S)     (mode covering; SFT/GKD)
    reverse_kl             KL(S || T) = sum_v p_S (log p_S - log p_T)     (mode seeking; MiniLLM, OPD)
    generalized_jsd        beta KL(T || M) + (1 - beta) KL(S || M),  M = (1-beta) p_S + beta p_T
                           (GKD, Agarwal et al. 2024, TRL convention: beta=0 -> KL(T||S),
                            beta=1 -> KL(S||T))
    forward_cross_entropy  -sum_v p_T log p_S   (DistIL; = forward_kl + H(p_T), same gradient)
    topk_*                 the same over the teacher's top-k tokens plus one tail bucket
    entropy                -sum_v p log p
"""
import jax
import jax.numpy as jnp


def _log_probs(logits, temperature):
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _kl(logp_a, logp_b):
    """KL(a || b) = sum exp(logp_a) (logp_a - logp_b) over the last axis (log-prob inputs)."""
    return jnp.sum(jnp.exp(logp_a) * (logp_a - logp_b), axis=-1)


def _jsd(student_logp, teacher_logp, beta):
    """Generalized JSD on log-probs, TRL's convention (see module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd needs 0 <= beta <= 1 (got {beta}).")
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    mixture_logp = jnp.logaddexp(student_logp + jnp.log1p(-beta), teacher_logp + jnp.log(beta))
    return beta * _kl(teacher_logp, mixture_logp) + (1.0 - beta) * _kl(student_logp, mixture_logp)


def _student_teacher_logp(student_logits, teacher_logits, temperature):
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    return _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)


def forward_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_T || p_S) = sum_v p_T (log p_T - log p_S) per position."""
    student_logp, teacher_logp = _student_teacher_logp(student_logits, teacher_logits, temperature)
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_S || p_T) = sum_v p_S (log p_S - log p_T) per position."""
    student_logp, teacher_logp = _student_teacher_logp(student_logits, teacher_logits, temperature)
    return _kl(student_logp, teacher_logp)


def generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024; TRL generalized_jsd_loss).

        M   = (1 - beta) p_S + beta p_T
        JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M)
    with the endpoints defined as beta = 0 -> KL(p_T || p_S), beta = 1 -> KL(p_S || p_T).
    beta is a Python float (a config constant).
    """
    student_logp, teacher_logp = _student_teacher_logp(student_logits, teacher_logits, temperature)
    return _jsd(student_logp, teacher_logp, beta)


def forward_cross_entropy(student_logits, teacher_logits, temperature=1.0):
    """Soft-label cross-entropy -sum_v p_T log p_S (DistIL-style forward distillation).

    Gradient w.r.t. the student logits: (p_S - p_T) / temperature; none to the teacher.
    """
    student_logp, teacher_logp = _student_teacher_logp(student_logits, teacher_logits, temperature)
    return -jnp.sum(jnp.exp(teacher_logp) * student_logp, axis=-1)


def entropy(logits, temperature=1.0):
    """Shannon entropy -sum_v p log p of softmax(logits / temperature) per position."""
    logp = _log_probs(logits, temperature)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def topk_tail_log_probs(student_logits, teacher_logits, k, temperature=1.0):
    """Log-probs of student and teacher on the teacher's top-k ids plus one tail bucket.

    Bins [..., k + 1]: the k tokens with the largest teacher logits (in descending order),
    then the tail holding the remaining mass 1 - sum_topk p. The tail log-prob is the
    logsumexp of the other tokens' log-probs, so it is exact even when the tail mass is
    tiny. Requires 1 <= k < V. Returns (student_bins, teacher_bins); the teacher is constant.
    """
    vocab = student_logits.shape[-1]
    if not 1 <= k < vocab:
        raise ValueError(f"top-k divergence needs 1 <= k < V (got k={k}, V={vocab}).")
    student_logp, teacher_logp = _student_teacher_logp(student_logits, teacher_logits, temperature)
    _, top_ids = jax.lax.top_k(teacher_logp, k)
    in_top = jnp.put_along_axis(
        jnp.zeros(teacher_logp.shape, bool), top_ids, True, axis=-1, inplace=False
    )

    def bins(logp):
        top = jnp.take_along_axis(logp, top_ids, axis=-1)
        tail = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, logp), axis=-1, keepdims=True)
        return jnp.concatenate([top, tail], axis=-1)

    return bins(student_logp), bins(teacher_logp)


def topk_forward_kl(student_logits, teacher_logits, k, temperature=1.0):
    """KL(T || S) over the teacher's top-k tokens plus a tail bucket (k + 1 bins)."""
    student_bins, teacher_bins = topk_tail_log_probs(student_logits, teacher_logits, k, temperature)
    return _kl(teacher_bins, student_bins)


def topk_reverse_kl(student_logits, teacher_logits, k, temperature=1.0):
    """KL(S || T) over the teacher's top-k tokens plus a tail bucket (k + 1 bins)."""
    student_bins, teacher_bins = topk_tail_log_probs(student_logits, teacher_logits, k, temperature)
    return _kl(student_bins, teacher_bins)


def topk_generalized_jsd(student_logits, teacher_logits, k, beta=0.5, temperature=1.0):
    """generalized_jsd (TRL convention) over the teacher's top-k tokens plus a tail bucket."""
    student_bins, teacher_bins = topk_tail_log_probs(student_logits, teacher_logits, k, temperature)
    return _jsd(student_bins, teacher_bins, beta)
