"""Reduce per-token loss values [..., T] under a completion mask to one scalar.

The choice of reduction is itself an objective choice (it sets how much each token and
each sequence weighs), so it is named in configs:

    token-mean               sum(v * m) / sum(m)                      (DAPO; PPO/GRPO in verl)
    seq-mean-token-mean      mean_b [ sum_t(v * m) / sum_t(m) ]         (original GRPO, GSPO)
    seq-mean-token-sum       mean_b [ sum_t(v * m) ]
    seq-mean-token-sum-norm  sum(v * m) / (B * L),  L = max_len or T    (Dr. GRPO, Liu et al. 2025)

Rows are all leading axes; the last axis is time. An all-masked row contributes 0 to the
sum and the mean over rows still counts it (B is the number of rows); nothing divides by
an empty count, so neither the value nor its gradient is ever NaN. A float mask acts as
per-token weights.
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
    if mode == "seq-mean-token-mean":
        return jnp.mean(safe_divide(row_sums, jnp.sum(mask.astype(values.dtype), axis=-1)))
    if mode == "seq-mean-token-sum":
        return jnp.mean(row_sums)
    length = values.shape[-1] if max_len is None else max_len
    return jnp.sum(weighted) / (row_sums.size * length)
