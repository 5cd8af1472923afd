"""Reduce per-token loss values [..., T] under a completion mask to one scalar.

The choice of reduction is itself an objective choice (it sets how much each token and
each sequence weighs), so it is named in configs:

    token-mean               sum(v * m) / sum(m)                      (DAPO; PPO/GRPO in verl)
    seq-mean-token-mean      sum_b [ sum_t(v * m) / sum_t(m) ] / B      (original GRPO, GSPO)
    seq-mean-token-sum       sum_b [ sum_t(v * m) ] / B
    seq-mean-token-sum-norm  sum(v * m) / (B * L),  L = max_len or T    (Dr. GRPO, Liu et al. 2025)

Rows are all leading axes; the last axis is time. B is the number of rows that count: rows
whose mask is not all zero. A row with mask 0 everywhere (padding, or a group dropped by a
row weight of 0) adds nothing and does not dilute the mean over rows. Nothing divides by an
empty count, so neither the value nor its gradient is ever NaN (an all-masked batch gives 0).
A float mask acts as per-token weights.
"""
import jax.numpy as jnp

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def safe_divide(numerator, denominator):
    """numerator / denominator where denominator != 0, else 0 (also 0 gradient there)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def masked_values(values, mask):
    """values * mask with masked-out entries exactly 0, even where values are inf or NaN."""
    mask = jnp.broadcast_to(mask, values.shape)
    weights = mask.astype(values.dtype)
    return jnp.where(mask != 0, values * weights, jnp.zeros_like(values))


def masked_mean(values, mask):
    """sum(v * m) / sum(m) over all entries; 0 when the mask is empty. Bool values count as 0/1."""
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.float32)
    mask = jnp.broadcast_to(mask, values.shape)
    return safe_divide(jnp.sum(masked_values(values, mask)), jnp.sum(mask.astype(values.dtype)))


def counted_rows(mask):
    """Number of rows (all leading axes) whose mask [..., T] has a nonzero entry: the B of
    the sequence-mean aggregations."""
    return jnp.sum(jnp.any(jnp.asarray(mask) != 0, axis=-1).astype(jnp.float32))


def aggregate(values, mask, mode="token-mean", max_len=None):
    """Aggregate per-token values [..., T] with mask [..., T] into a scalar (see module doc).

    Args:
      values: float[..., T] per-token loss values.
      mask: bool or float[..., T]; 1 on completion tokens.
      mode: one of AGGREGATIONS.
      max_len: L for "seq-mean-token-sum-norm" (Dr. GRPO's constant normalizer, usually
        the generation budget); defaults to T. Ignored by the other modes.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {mode!r}; choose one of {AGGREGATIONS}.")
    mask = jnp.broadcast_to(mask, values.shape)
    weighted = masked_values(values, mask)
    if mode == "token-mean":
        return safe_divide(jnp.sum(weighted), jnp.sum(mask.astype(values.dtype)))
    row_sums = jnp.sum(weighted, axis=-1)
    rows = counted_rows(mask).astype(values.dtype)
    if mode == "seq-mean-token-mean":
        return safe_divide(jnp.sum(safe_divide(row_sums, jnp.sum(mask.astype(values.dtype), axis=-1))), rows)
    if mode == "seq-mean-token-sum":
        return safe_divide(jnp.sum(row_sums), rows)
    length = values.shape[-1] if max_len is None else max_len
    return safe_divide(jnp.sum(weighted), rows * length)
