"""Attention dispatch: `attention(q, k, v, mask, implementation=None)`.

"reference": plain jnp (`reference.py`), used on CPU and for tests.
"xla": `jax.nn.dot_product_attention`, which lowers to cuDNN flash attention on GPUs.
None picks "xla" on GPU and "reference" elsewhere. Both are tested against each other.
"""

import jax

from kernels.attention import reference


def attention(q, k, v, mask, implementation: str | None = None):
    """q [B,T,H,Dh], k/v [B,Hkv,S,Dh], mask bool[B,T,S] -> [B,T,H,Dh]."""
    if implementation is None:
        implementation = "xla" if jax.default_backend() == "gpu" else "reference"
    if implementation == "reference":
        return reference.attention(q, k, v, mask)
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                            mask=mask[:, None, :, :])
    raise ValueError(f"Unknown attention implementation {implementation!r}; use 'reference' or 'xla'.")
