"""Grouped-query attention: `api.attention` dispatches to the reference or XLA's fused form."""
