"""Public entry points: per-token log-probabilities, entropies and teacher-student
divergences from hidden states and LM heads, dispatched by size.

``implementation=None`` picks ``"reference"`` (materialize the logits; cheapest for small
problems) when the float32 logits ``N * V * 4`` bytes fit in `REFERENCE_MAX_LOGITS_BYTES`,
else ``"chunked"`` (stream over token chunks with a recomputing custom VJP; never holds the
``[N, V]`` logits). Both compute in float32 and return float32.
"""
import math

from bridge.kernels.logprobs import chunked, reference

IMPLEMENTATIONS = ("reference", "chunked")
REFERENCE_MAX_LOGITS_BYTES = 64 * 2**20


def _static_number(value, name):
    try:
        return float(value)
    except TypeError as error:  # a tracer raises jax.errors.ConcretizationTypeError
        raise TypeError(
            f"{name} must be a Python number (it is static: it fixes the compiled kernel); got "
            f"{type(value).__name__}. Under jax.jit pass it through functools.partial or "
            f"static_argnames.") from error


def _choose_implementation(implementation, n_tokens, vocab_size):
    if implementation is None:
        materialized_bytes = n_tokens * vocab_size * 4
        return "reference" if materialized_bytes <= REFERENCE_MAX_LOGITS_BYTES else "chunked"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; expected None (choose by "
                         f"size) or one of {IMPLEMENTATIONS}")
    return implementation


def _check_head(hidden, head, who):
    if head.ndim != 2 or hidden.shape[-1] != head.shape[0]:
        raise ValueError(f"{who}: hidden [..., D] {hidden.shape} and head [D, V] {head.shape} "
                         f"do not match; the head must be [D, V] (transpose an embedding [V, D])")


def _check_temperature(temperature):
    temperature = _static_number(temperature, "temperature")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def _check_chunk_size(chunk_size):
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def token_logprobs(hidden, lm_head, targets, temperature=1.0, *, return_entropy=False,
                   chunk_size=None, implementation=None):
    """Log-probability of each target token under softmax(hidden @ lm_head / temperature).

      logp[b, t] = z[b, t, targets[b, t]] - logsumexp_v z[b, t, v],
      z = hidden @ lm_head / temperature      (float32 accumulation)
      entropy[b, t] = -sum_v p[b, t, v] log p[b, t, v]      (with return_entropy)

    Args:
      hidden: float[B, T, D] (any float dtype; more leading axes are fine).
      lm_head: [D, V] output projection.
      targets: int[B, T] token ids in [0, V).
      temperature: Python number > 0 (static).
      return_entropy: also return the entropy of the same tempered distribution.
      chunk_size: token rows per chunk for ``"chunked"`` (default: by vocabulary size).
      implementation: None (by size), ``"reference"`` or ``"chunked"``.

    For data parallelism call it inside ``jax.shard_map`` (hidden and targets sharded over
    the batch, lm_head replicated): see `chunked`.

    Returns:
      float32[B, T] log-probabilities, or (logp, entropy) with ``return_entropy``. Both are
      differentiable with respect to ``hidden`` and ``lm_head``.
    """
    _check_head(hidden, lm_head, "token_logprobs")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"token_logprobs: targets {targets.shape} must have the leading shape "
                         f"of hidden {hidden.shape}")
    temperature = _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    n_tokens = math.prod(hidden.shape[:-1])
    if _choose_implementation(implementation, n_tokens, lm_head.shape[1]) == "reference":
        return reference.token_logprobs(hidden, lm_head, targets, temperature,
                                        return_entropy=return_entropy)
    return chunked.token_logprobs(hidden, lm_head, targets, temperature,
                                  return_entropy=return_entropy, chunk_size=chunk_size)


def token_divergence(student_hidden, student_head, teacher_hidden, teacher_head, kind, *,
                     beta=0.5, top_k=0, temperature=1.0, chunk_size=None, implementation=None):
    """Per-position divergence between teacher and student next-token distributions.

    p_S = softmax(student_hidden @ student_head / temperature), p_T likewise for the
    teacher, over the full shared vocabulary V (the two hidden sizes may differ):

      "forward_kl"  KL(T||S) = sum_v p_T (log p_T - log p_S)
      "reverse_kl"  KL(S||T) = sum_v p_S (log p_S - log p_T)
      "jsd"         generalized JSD, TRL/GKD convention (Agarwal et al. 2024): beta = 0 is
                    KL(T||S), beta = 1 is KL(S||T), otherwise with
                    M = (1 - beta) p_S + beta p_T:  beta KL(T||M) + (1 - beta) KL(S||M)
      "forward_ce"  -sum_v p_T log p_S

    ``top_k > 0`` compares both distributions over k + 1 bins: the teacher's k most likely
    tokens and one tail bucket holding the remaining mass. Gradients flow to
    ``student_hidden`` and ``student_head`` only (the teacher is a stop-gradient constant).

    Args:
      student_hidden: float[B, T, D_S]; student_head: [D_S, V].
      teacher_hidden: float[B, T, D_T]; teacher_head: [D_T, V].
      kind: one of ``reference.DIVERGENCE_KINDS``.
      beta: JSD mixture weight in [0, 1] (Python number; used by "jsd" only).
      top_k: 0 for the full vocabulary, else 0 < k < V.
      temperature: Python number > 0 dividing both models' logits.
      chunk_size, implementation: as in `token_logprobs`.

    Returns:
      float32[B, T].
    """
    _check_head(student_hidden, student_head, "token_divergence (student)")
    _check_head(teacher_hidden, teacher_head, "token_divergence (teacher)")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"token_divergence: student hidden {student_hidden.shape} and teacher "
                         f"hidden {teacher_hidden.shape} must share the leading [B, T] shape")
    vocab_size = student_head.shape[1]
    if teacher_head.shape[1] != vocab_size:
        raise ValueError(f"token_divergence: student vocabulary {vocab_size} != teacher "
                         f"vocabulary {teacher_head.shape[1]}; the tokenizers must match")
    if kind not in reference.DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of "
                         f"{reference.DIVERGENCE_KINDS}")
    beta = _static_number(beta, "beta")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    top_k = int(top_k)
    if not 0 <= top_k < vocab_size:
        raise ValueError(f"top_k must be in [0, V) = [0, {vocab_size}), got {top_k}")
    temperature = _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    n_tokens = math.prod(student_hidden.shape[:-1])
    if _choose_implementation(implementation, n_tokens, vocab_size) == "reference":
        return reference.token_divergence(student_hidden, student_head, teacher_hidden,
                                          teacher_head, kind, beta=beta, top_k=top_k,
                                          temperature=temperature)
    return chunked.token_divergence(student_hidden, student_head, teacher_hidden, teacher_head,
                                    kind, beta=beta, top_k=top_k, temperature=temperature,
                                    chunk_size=chunk_size)
