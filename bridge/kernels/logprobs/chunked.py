"""Streaming variant: token chunks under `lax.map`/`lax.scan`, custom VJPs that recompute.

The ``[N, V]`` logits are never materialized. The forward pass maps over chunks of
``chunk_size`` token rows, computes that chunk's ``[chunk_size, V]`` float32 logits and
reduces them at once to per-token numbers (log p[target], logsumexp, entropy, divergence).
Only those ``[N]`` numbers and the inputs are kept for the backward pass, which scans over
the same chunks, recomputes each chunk's logits and forms the logit cotangent ``dz``:

  token log-prob  d log p_t / dz = onehot(t) - p
  entropy         d H / dz       = -p * (log p + H)
  divergences     ``jax.vjp`` of the per-chunk divergence (`reference.divergence_from_logits`)

then ``d hidden_chunk = dz @ W^T / temperature`` (one output slice per chunk) and
``dW += hidden_chunk^T @ dz / temperature`` into a float32 ``[D, V]`` scan carry, which is
the head gradient itself (an output, not a temporary). That add goes in place one
vocabulary tile at a time (`_add_head_gradient`): a plain add makes XLA hold the [D, V]
product as a second gradient-sized temporary. The logits themselves need no vocabulary
chunking: the token chunk size bounds them. Rows are zero-padded up to a whole number of
chunks; padded rows get zero cotangent.

Data parallelism: call the kernels inside ``jax.shard_map`` with the hidden states sharded
over the batch and the heads replicated; each device streams its own rows, and the head
gradient is psummed once per backward pass (`_sum_to_axes_of`). Under plain ``jax.jit``
with a batch-sharded input the chunk slicing runs over the sharded row axis.
"""
import functools
import math

import jax
import jax.numpy as jnp

from bridge.kernels.logprobs import reference

# Target size of one [chunk_size, V] float32 buffer when chunk_size is not given; the
# backward pass of a divergence keeps several such buffers alive at once.
LOGITS_CHUNK_BYTES = 128 * 2**20
MAX_DEFAULT_CHUNK = 1024
# Size of the [D, tile] float32 temporary per in-place update of the head gradient.
HEAD_GRADIENT_TILE_BYTES = 128 * 2**20


def default_chunk_size(n_tokens, vocab_size):
    """At most the largest power of two with ``chunk * V * 4 <= LOGITS_CHUNK_BYTES`` (in
    [8, 1024]), then evened out over the chunks it implies, rounded up to a multiple of 8,
    so little padding is computed (1536 tokens -> two chunks of 768, not two of 1024)."""
    rows = max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))
    cap = min(max(8, 1 << (rows.bit_length() - 1)), MAX_DEFAULT_CHUNK)
    if n_tokens <= cap:
        return max(1, n_tokens)
    n_chunks = -(-n_tokens // cap)
    return min(cap, 8 * -(-(-(-n_tokens // n_chunks)) // 8))


def _to_chunks(x, chunk_size):
    """[N, ...] -> [ceil(N / chunk_size), chunk_size, ...], zero-padding the last chunk."""
    n_chunks = -(-x.shape[0] // chunk_size)
    pad = n_chunks * chunk_size - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk_size, *x.shape[1:])


def _from_chunks(x, n_rows):
    """Inverse of `_to_chunks`: [n_chunks, chunk_size, ...] -> [n_rows, ...]."""
    return x.reshape(-1, *x.shape[2:])[:n_rows]


def _head_gradient_tile(width, vocab_size):
    """Columns per in-place update of the float32 [D, V] head gradient: a multiple of 128
    with ``D * tile * 4 <= HEAD_GRADIENT_TILE_BYTES``, at most V."""
    columns = max(128, HEAD_GRADIENT_TILE_BYTES // (4 * width) // 128 * 128)
    return min(columns, vocab_size)


def _add_head_gradient(d_head, hidden_chunk, dz):
    """``d_head + hidden_chunk^T @ dz`` updated in place one vocabulary tile at a time.

    A plain ``d_head + h^T @ dz`` makes XLA materialize the [D, V] product as a temporary
    as large as the gradient itself; tiling bounds it to [D, tile]. The last tile is
    shifted left to end at V, and its columns already added by the previous tile masked.
    """
    width, vocab_size = d_head.shape
    tile = _head_gradient_tile(width, vocab_size)
    if tile == vocab_size:
        return d_head + jnp.einsum("cd,cv->dv", hidden_chunk, dz,
                                   preferred_element_type=jnp.float32)

    def add_tile(index, d_head):
        start = jnp.minimum(index * tile, vocab_size - tile)
        not_yet_added = start + jnp.arange(tile) >= index * tile
        dz_tile = jnp.where(not_yet_added[None, :],
                            jax.lax.dynamic_slice_in_dim(dz, start, tile, axis=1), 0)
        update = jax.lax.dynamic_slice_in_dim(d_head, start, tile, axis=1) + jnp.einsum(
            "cd,cv->dv", hidden_chunk, dz_tile, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(d_head, update, start, axis=1)

    return jax.lax.fori_loop(0, -(-vocab_size // tile), add_tile, d_head)


def _varying_like(x, *like):
    """Inside `jax.shard_map`, mark ``x`` as varying over the mesh axes any of ``like`` varies
    over, so a scan carry initialized with it has the type of its updates (no-op outside)."""
    axes = (set().union(*(jax.typeof(y).manual_axis_type.varying for y in like))
            - jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def _sum_to_axes_of(cotangent, primal):
    """Inside `jax.shard_map`, psum a cotangent over the mesh axes it varies over but its
    primal does not (a head replicated across data-parallel shards gets the sum of the
    shards' gradients, once per backward pass); no-op outside."""
    axes = (jax.typeof(cotangent).manual_axis_type.varying
            - jax.typeof(primal).manual_axis_type.varying)
    return jax.lax.psum(cotangent, tuple(sorted(axes))) if axes else cotangent


def _scan_gradients(logit_cotangent_fn, hidden, lm_head, temperature, chunk_size, xs):
    """Backward scan shared by both kernels.

    ``logit_cotangent_fn(hidden_chunk, chunk_xs)`` gives dL/dz of one chunk for the tempered
    logits z = h @ W / temperature; this scans it over the chunks of ``hidden`` (and
    ``xs``) and returns (dL/dhidden [N, D], dL/dW [D, V]) in the input dtypes.
    """
    compute_dtype = jnp.result_type(hidden.dtype, lm_head.dtype)

    def step(d_head, chunk):
        hidden_chunk, chunk_xs = chunk
        dz = (logit_cotangent_fn(hidden_chunk, chunk_xs) / temperature).astype(compute_dtype)
        d_hidden = jnp.einsum("cv,dv->cd", dz, lm_head, preferred_element_type=jnp.float32)
        return _add_head_gradient(d_head, hidden_chunk, dz), d_hidden.astype(hidden.dtype)

    d_head_init = _varying_like(jnp.zeros(lm_head.shape, jnp.float32), hidden, lm_head)
    d_head, d_hidden = jax.lax.scan(step, d_head_init, (_to_chunks(hidden, chunk_size), xs))
    d_hidden = _from_chunks(d_hidden, hidden.shape[0])
    return (_sum_to_axes_of(d_hidden, hidden),
            _sum_to_axes_of(d_head, lm_head).astype(lm_head.dtype))


# ---------------------------------------------------------------- token log-probabilities


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _logprobs(temperature, chunk_size, with_entropy, hidden, lm_head, targets):
    return _logprobs_forward(temperature, chunk_size, with_entropy, hidden, lm_head, targets)[0]


def _logprobs_forward(temperature, chunk_size, with_entropy, hidden, lm_head, targets):
    n_rows = hidden.shape[0]

    def chunk_forward(chunk):
        hidden_chunk, target_chunk = chunk
        logits = reference.tempered_logits(hidden_chunk, lm_head, temperature)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, target_chunk[:, None], axis=-1)[:, 0]
        if not with_entropy:
            return target_logit - lse, lse
        log_probs = logits - lse[:, None]
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
        return target_logit - lse, lse, entropy

    outputs = jax.lax.map(
        chunk_forward, (_to_chunks(hidden, chunk_size), _to_chunks(targets, chunk_size)))
    logp, lse = _from_chunks(outputs[0], n_rows), outputs[1]
    if not with_entropy:
        return logp, (hidden, lm_head, targets, lse, None)
    entropy = _from_chunks(outputs[2], n_rows)
    return (logp, entropy), (hidden, lm_head, targets, lse, entropy)


def _logprobs_backward(temperature, chunk_size, with_entropy, residuals, cotangent):
    hidden, lm_head, targets, lse_chunks, entropy = residuals
    logp_cotangent, entropy_cotangent = cotangent if with_entropy else (cotangent, None)
    vocab_ids = jnp.arange(lm_head.shape[1], dtype=jnp.int32)

    def logit_cotangent(hidden_chunk, chunk):
        target_chunk, lse, g_logp, entropy_terms = chunk
        logits = reference.tempered_logits(hidden_chunk, lm_head, temperature)
        log_probs = logits - lse[:, None]
        probs = jnp.exp(log_probs)
        one_hot = vocab_ids[None, :] == target_chunk[:, None]
        dz = g_logp[:, None] * (one_hot - probs)
        if with_entropy:
            g_entropy, chunk_entropy = entropy_terms
            dz = dz - g_entropy[:, None] * probs * (log_probs + chunk_entropy[:, None])
        return dz

    entropy_terms = ((_to_chunks(entropy_cotangent, chunk_size), _to_chunks(entropy, chunk_size))
                     if with_entropy else None)
    xs = (_to_chunks(targets, chunk_size), lse_chunks, _to_chunks(logp_cotangent, chunk_size),
          entropy_terms)
    d_hidden, d_head = _scan_gradients(logit_cotangent, hidden, lm_head, temperature,
                                       chunk_size, xs)
    return d_hidden, d_head, None


_logprobs.defvjp(_logprobs_forward, _logprobs_backward)


def token_logprobs(hidden, lm_head, targets, temperature=1.0, *, return_entropy=False,
                   chunk_size=None):
    """log softmax(hidden @ lm_head / temperature)[targets], streamed over token chunks.

    hidden float[..., D], lm_head [D, V], targets int[...] -> float32[...] (and the entropy
    of the same tempered distribution with ``return_entropy``). ``temperature`` is a
    Python number; ``chunk_size`` defaults to `default_chunk_size`.
    """
    lead_shape, width = hidden.shape[:-1], hidden.shape[-1]
    n_rows = math.prod(lead_shape)
    chunk_size = chunk_size or default_chunk_size(n_rows, lm_head.shape[1])
    outputs = _logprobs(float(temperature), int(chunk_size), bool(return_entropy),
                        hidden.reshape(n_rows, width), lm_head,
                        targets.reshape(n_rows).astype(jnp.int32))
    return jax.tree.map(lambda x: x.reshape(lead_shape), outputs)


# ------------------------------------------------------------- teacher-student divergences


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _divergence(kind, beta, top_k, temperature, chunk_size,
                student_hidden, student_head, teacher_hidden, teacher_head):
    return _divergence_forward(kind, beta, top_k, temperature, chunk_size,
                               student_hidden, student_head, teacher_hidden, teacher_head)[0]


def _divergence_forward(kind, beta, top_k, temperature, chunk_size,
                        student_hidden, student_head, teacher_hidden, teacher_head):
    def chunk_forward(chunk):
        student_chunk, teacher_chunk = chunk
        return reference.divergence_from_logits(
            reference.tempered_logits(student_chunk, student_head, temperature),
            reference.tempered_logits(teacher_chunk, teacher_head, temperature),
            kind, beta, top_k)

    divergence = jax.lax.map(chunk_forward, (_to_chunks(student_hidden, chunk_size),
                                             _to_chunks(teacher_hidden, chunk_size)))
    residuals = (student_hidden, student_head, teacher_hidden, teacher_head)
    return _from_chunks(divergence, student_hidden.shape[0]), residuals


def _divergence_backward(kind, beta, top_k, temperature, chunk_size, residuals, cotangent):
    student_hidden, student_head, teacher_hidden, teacher_head = residuals

    def logit_cotangent(student_chunk, chunk):
        teacher_chunk, g = chunk
        teacher_logits = reference.tempered_logits(teacher_chunk, teacher_head, temperature)
        _, divergence_vjp = jax.vjp(
            lambda logits: reference.divergence_from_logits(
                logits, teacher_logits, kind, beta, top_k),
            reference.tempered_logits(student_chunk, student_head, temperature))
        return divergence_vjp(g)[0]

    xs = (_to_chunks(teacher_hidden, chunk_size), _to_chunks(cotangent, chunk_size))
    d_hidden, d_head = _scan_gradients(logit_cotangent, student_hidden, student_head,
                                       temperature, chunk_size, xs)
    return d_hidden, d_head, None, None


_divergence.defvjp(_divergence_forward, _divergence_backward)


def token_divergence(student_hidden, student_head, teacher_hidden, teacher_head, kind, *,
                     beta=0.5, top_k=0, temperature=1.0, chunk_size=None):
    """Per-position teacher-student divergence, streamed over token chunks.

    Same contract as `reference.token_divergence`: [..., D_S], [D_S, V], [..., D_T],
    [D_T, V] -> float32[...], gradients to the student only.
    """
    lead_shape = student_hidden.shape[:-1]
    n_rows = math.prod(lead_shape)
    chunk_size = chunk_size or default_chunk_size(n_rows, student_head.shape[1])
    divergence = _divergence(
        kind, float(beta), int(top_k), float(temperature), int(chunk_size),
        student_hidden.reshape(n_rows, student_hidden.shape[-1]), student_head,
        teacher_hidden.reshape(n_rows, teacher_hidden.shape[-1]), teacher_head)
    return divergence.reshape(lead_shape)
