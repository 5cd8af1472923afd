"""Teacher-forced scoring of completions: per-token logprobs and full-vocabulary divergences.

A batch holds left-padded prompts and right-padded completions:
    prompt_tokens int32[B, P], prompt_mask bool[B, P], tokens int32[B, N], mask bool[B, N].
The hidden state that predicts completion token t sits at position P - 1 + t of the joined
sequence. Logits are never materialized: `kernels.logprobs` streams over the vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.logprobs import token_divergence, token_logprobs


def completion_hidden(model, batch) -> jax.Array:
    """Hidden states [B, N, D] that predict each completion token."""
    prompt_tokens, prompt_mask, tokens = batch["prompt_tokens"], batch["prompt_mask"], batch["tokens"]
    seq = jnp.concatenate([prompt_tokens, tokens], axis=1)
    att = jnp.concatenate([prompt_mask.astype(bool), jnp.ones(tokens.shape, bool)], axis=1)
    hidden = model.hidden_states(seq, attention_mask=att)
    p = prompt_tokens.shape[1]
    return hidden[:, p - 1: p - 1 + tokens.shape[1]]


def completion_logprobs(model, batch, temperature: float = 1.0, return_entropy: bool = False):
    """log pi(y_t | x, y_<t) float32[B, N] (and the entropy of pi at each position)."""
    return token_logprobs(completion_hidden(model, batch), model.head(), batch["tokens"],
                          temperature, return_entropy=return_entropy)


def completion_divergence(student, teacher, batch, kind: str, *, beta: float = 0.5, top_k: int = 0,
                          temperature: float = 1.0) -> jax.Array:
    """Per-token divergence float32[B, N] between the full next-token distributions of student
    and teacher (teacher under stop-gradient): "forward_kl", "reverse_kl", "jsd", "forward_ce"."""
    teacher_hidden = jax.lax.stop_gradient(completion_hidden(teacher, batch))
    teacher_head = jax.lax.stop_gradient(teacher.head())
    return token_divergence(completion_hidden(student, batch), student.head(), teacher_hidden,
                            teacher_head, kind, beta=beta, top_k=top_k, temperature=temperature)
