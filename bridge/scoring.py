"""Teacher-forced scoring of completions: per-token logprobs and full-vocabulary divergences.

A batch holds left-padded prompts and right-padded completions:
    prompt_tokens int32[B, P], prompt_mask bool[B, P], tokens int32[B, N], mask bool[B, N].
The hidden state that predicts completion token t sits at position P - 1 + t of the joined
sequence. Logits are never materialized: `bridge.kernels.logprobs` streams over the vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bridge.sharding import join_rows, split_rows
from bridge.kernels.logprobs import token_divergence, token_logprobs

BATCH_AXES = ("data", "fsdp")


def batch_parallel(fn, batch_args: tuple, shared_args: tuple):
    """fn(*batch_args, *shared_args) computed per batch shard under the current mesh.

    The streaming kernels loop over token chunks; under plain GSPMD a loop over a
    batch-sharded axis would slice across devices every iteration. Inside `shard_map` each
    device streams over its own rows, the shared heads are replicated, and their gradients
    are summed across shards once. Without a mesh (or with rows that do not divide) fn runs
    as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names and mesh.shape[a] > 1)
    rows = batch_args[0].shape[0]
    if not axes or rows % math.prod(mesh.shape[a] for a in axes):
        return fn(*batch_args, *shared_args)
    spec = P(axes)
    return jax.shard_map(fn, in_specs=(spec,) * len(batch_args) + (P(),) * len(shared_args),
                         out_specs=spec)(*batch_args, *shared_args)


def in_slices(fn, slices: int):
    """fn(params, batch) -> arrays [R, ...], computed one strided slice of rows at a time
    (`lax.map` over `bridge.sharding.split_rows`), so only one slice's activations are alive;
    outputs come back in the batch's row order."""
    if slices == 1:
        return fn

    def sliced(params, batch):
        return join_rows(jax.lax.map(lambda piece: fn(params, piece), split_rows(batch, slices)))

    return sliced


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
    return hidden_logprobs(completion_hidden(model, batch), batch["tokens"], model.head(), temperature, return_entropy)


def hidden_logprobs(hidden, tokens, head, temperature: float = 1.0, return_entropy: bool = False):
    """log-probabilities of `tokens` [B, N] under the head [D, V] applied to hidden [B, N, D],
    streamed over the vocabulary per batch shard (and the entropies)."""
    fn = lambda h, t, w: token_logprobs(h, w, t, temperature, return_entropy=return_entropy)  # noqa: E731
    return batch_parallel(fn, (hidden, tokens), (head,))


def completion_divergence(student, teacher, batch, kind: str, *, beta: float = 0.5, top_k: int = 0,
                          temperature: float = 1.0) -> jax.Array:
    """Per-token divergence float32[B, N] between the full next-token distributions of student
    and teacher (teacher under stop-gradient): "forward_kl", "reverse_kl", "jsd", "forward_ce"."""
    teacher_hidden = jax.lax.stop_gradient(completion_hidden(teacher, batch))
    teacher_head = jax.lax.stop_gradient(teacher.head())
    fn = lambda sh, th, sw, tw: token_divergence(sh, sw, th, tw, kind, beta=beta, top_k=top_k,  # noqa: E731
                                                 temperature=temperature)
    return batch_parallel(fn, (completion_hidden(student, batch), teacher_hidden), (student.head(), teacher_head))
