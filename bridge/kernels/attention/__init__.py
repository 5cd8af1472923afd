"""Grouped-query attention: `api.attention` dispatches to the reference, the blocked
online-softmax kernel (`chunked`) or XLA's fused form, by backend and size."""
