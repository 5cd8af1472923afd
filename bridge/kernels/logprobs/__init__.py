"""Memory-safe per-token log-probabilities, entropies and teacher-student divergences.

``token_logprobs`` and ``token_divergence`` (see `api`) never materialize [B, T, V] logits
above a small size: they stream over token chunks with custom VJPs that recompute logits.
"""
from bridge.kernels.logprobs.api import token_divergence, token_logprobs

__all__ = ["token_logprobs", "token_divergence"]
