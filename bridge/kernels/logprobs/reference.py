"""Plain-jnp reference: materialize the logits, log-softmax, gather.

This is the definition every faster variant is tested against, and the right choice for
small problems, where materializing ``[N, V]`` logits is cheaper than streaming. The
per-row math (`logprob_and_entropy_from_logits`, `divergence_from_logits`) is shared
with the chunked variant, which applies it to one chunk of rows at a time.

Conventions (all functions):
  logits ``z = hidden @ lm_head / temperature`` computed with float32 accumulation;
  ``log p = z - logsumexp(z)`` over the full vocabulary.
"""
import jax
import jax.numpy as jnp

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd", "forward_ce")


def tempered_logits(hidden, lm_head, temperature):
    """``hidden @ lm_head / temperature`` in float32: [..., D] x [D, V] -> float32[..., V]."""
    logits = jnp.einsum("...d,dv->...v", hidden, lm_head, preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32) / temperature


def logprob_and_entropy_from_logits(logits, targets):
    """Per-row log p[target] and entropy of ``softmax(logits)``.

    logits float32[..., V], targets int[...] -> (log p[target], H = -sum_v p_v log p_v),
    both float32[...].
    """
    lse = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - lse[..., None]
    logp = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return logp, entropy


def token_logprobs(hidden, lm_head, targets, temperature=1.0, *, return_entropy=False):
    """log softmax(hidden @ lm_head / temperature)[targets], materializing the logits.

    hidden float[..., D], lm_head [D, V], targets int[...] -> float32[...]; with
    ``return_entropy`` also the entropy of the same tempered distribution.
    """
    logits = tempered_logits(hidden, lm_head, temperature)
    logp, entropy = logprob_and_entropy_from_logits(logits, targets)
    return (logp, entropy) if return_entropy else logp


def divergence_from_logprobs(student_logp, teacher_logp, kind, beta=0.5):
    """Per-row divergence between two distributions given as log-probabilities over bins.

    With p_S = exp(student_logp), p_T = exp(teacher_logp), summing over the last axis:
      forward_kl  KL(T||S) = sum p_T (log p_T - log p_S)
      reverse_kl  KL(S||T) = sum p_S (log p_S - log p_T)
      forward_ce  -sum p_T log p_S   (= KL(T||S) + H(T))
      jsd         generalized Jensen-Shannon divergence in TRL's convention
                  (Agarwal et al. 2024, "On-Policy Distillation of Language Models", GKD):
                  beta = 0 -> KL(T||S); beta = 1 -> KL(S||T); otherwise with the mixture
                  M = (1 - beta) p_S + beta p_T,  JSD = beta KL(T||M) + (1 - beta) KL(S||M).
    Everything stays in log space, so bins with underflowing mass contribute 0, not NaN,
    as long as the log-probabilities are finite.
    """
    p_student = jnp.exp(student_logp)
    p_teacher = jnp.exp(teacher_logp)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return jnp.sum(p_teacher * (teacher_logp - student_logp), axis=-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return jnp.sum(p_student * (student_logp - teacher_logp), axis=-1)
    if kind == "forward_ce":
        return -jnp.sum(p_teacher * student_logp, axis=-1)
    if kind == "jsd":
        mixture_logp = jnp.logaddexp(student_logp + jnp.log1p(-beta), teacher_logp + jnp.log(beta))
        kl_teacher_mixture = jnp.sum(p_teacher * (teacher_logp - mixture_logp), axis=-1)
        kl_student_mixture = jnp.sum(p_student * (student_logp - mixture_logp), axis=-1)
        return beta * kl_teacher_mixture + (1.0 - beta) * kl_student_mixture
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")


def top_k_bins(student_logp, teacher_logp, top_k):
    """Restrict both distributions to the teacher's top-k tokens plus one tail bucket.

    float32[N, V] log-probabilities -> float32[N, k + 1]: the log-probabilities of the teacher's k
    most likely tokens, then log of the remaining mass (logsumexp over the other V - k
    tokens, exact in log space, no ``log(1 - sum)`` cancellation). Requires k < V.
    """
    top_indices = jax.lax.top_k(teacher_logp, top_k)[1]
    rows = jnp.arange(teacher_logp.shape[0])[:, None]
    in_top_k = jnp.zeros(teacher_logp.shape, bool).at[rows, top_indices].set(True)

    def bins(logp):
        top = jnp.take_along_axis(logp, top_indices, axis=-1)
        tail = jax.nn.logsumexp(jnp.where(in_top_k, -jnp.inf, logp), axis=-1)
        return jnp.concatenate([top, tail[:, None]], axis=-1)

    return bins(student_logp), bins(teacher_logp)


def divergence_from_logits(student_logits, teacher_logits, kind, beta=0.5, top_k=0):
    """Per-row divergence from float32[N, V] student and teacher logits -> float32[N].

    The teacher is a constant (stop-gradient); ``top_k > 0`` compares the two over the
    teacher's top-k support plus a tail bucket (`top_k_bins`).
    """
    student_logp = jax.nn.log_softmax(student_logits, axis=-1)
    teacher_logp = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits, axis=-1))
    if top_k > 0:
        student_logp, teacher_logp = top_k_bins(student_logp, teacher_logp, top_k)
    return divergence_from_logprobs(student_logp, teacher_logp, kind, beta)


def token_divergence(student_hidden, student_head, teacher_hidden, teacher_head, kind, *,
                     beta=0.5, top_k=0, temperature=1.0):
    """Per-position teacher-student divergence over the full vocabulary, materializing logits.

    student_hidden [..., D_S], student_head [D_S, V], teacher_hidden [..., D_T],
    teacher_head [D_T, V] -> float32[...]; both logits are divided by ``temperature``.
    Gradients flow to the student only. See `divergence_from_logprobs` for the kinds.
    """
    lead_shape = student_hidden.shape[:-1]
    student_logits = tempered_logits(student_hidden, student_head, temperature)
    teacher_logits = tempered_logits(teacher_hidden, teacher_head, temperature)
    vocab = student_logits.shape[-1]
    divergence = divergence_from_logits(
        student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), kind, beta, top_k)
    return divergence.reshape(lead_shape)
