"""Decoder configuration: one frozen dataclass for the Qwen3, Qwen2/2.5 and Llama 3 families.

`ModelConfig.from_hf(dict)` reads a Hugging Face `config.json`; `to_hf()` writes one back that
`transformers.AutoConfig` loads. The families differ only in a few switches:

| family | qk_norm | qkv_bias | rope                 |
|--------|---------|----------|----------------------|
| qwen3  | yes     | no       | default              |
| qwen2  | no      | yes      | default              |
| llama  | no      | no*      | default or "llama3"  |

(*) Llama's `attention_bias` / `mlp_bias` switches are honoured when set.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "llama": ("LlamaForCausalLM",),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: Any):
    """'bfloat16' | jnp dtype -> jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(_DTYPES)}.")
        return _DTYPES[name]
    return jnp.dtype(name).type if name is not None else jnp.float32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (all three families)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # llama3 parameters as sorted items
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False  # rematerialize each block in the backward pass
    scan_layers: bool = False  # stack the blocks' params on a "layers" axis and lax.scan them
    extra_hf: str = "{}"  # JSON of config.json keys we do not model, kept for export

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Unknown model family {self.family!r}; supported: {sorted(FAMILIES)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}."
            )

    @property
    def rope_params(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, v, h, kv, hd = (self.hidden_size, self.intermediate_size, self.vocab_size,
                              self.num_heads, self.num_kv_heads, self.head_dim)
        attn = d * h * hd * 2 + d * kv * hd * 2
        block = attn + 3 * d * f + 2 * d + (2 * hd if self.qk_norm else 0)
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * block + d

    # ---- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, *, dtype=jnp.float32, param_dtype=None) -> "ModelConfig":
        """Builds a config from a parsed `config.json`; names the problem on unknown families."""
        family = _detect_family(hf)
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"Unsupported rope_type {rope_type!r} (supported: default, llama3).")
        rope_scaling = ()
        if rope_type == "llama3":
            src = rope if "factor" in rope else scaling
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            rope_scaling = tuple(sorted((k, src[k]) for k in keys))
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        known = set(_HF_KEYS) | {"rope_parameters", "rope_scaling", "rope_theta", "architectures",
                                 "model_type", "torch_dtype", "dtype", "head_dim",
                                 "attention_bias", "mlp_bias", "transformers_version"}
        extra = {k: v for k, v in hf.items() if k not in known}
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=family == "llama" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_as_eos(hf.get("eos_token_id")),
            dtype=dtype_from_name(dtype),
            param_dtype=dtype_from_name(param_dtype if param_dtype is not None else dtype),
            extra_hf=json.dumps(extra, sort_keys=True),
        )

    def to_hf(self) -> dict:
        """A `config.json` dict that transformers loads into the matching architecture."""
        out = dict(json.loads(self.extra_hf))
        rope = {"rope_type": "llama3" if self.rope_scaling else "default", "rope_theta": self.rope_theta}
        rope.update(self.rope_params)
        out.update(
            architectures=list(FAMILIES[self.family]),
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
            rope_scaling=rope if self.rope_scaling else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            torch_dtype={jnp.bfloat16: "bfloat16", jnp.float16: "float16"}.get(self.param_dtype, "float32"),
        )
        if self.family == "llama":
            out.update(attention_bias=self.o_bias or self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.family == "qwen3":
            out.update(attention_bias=False)
        return out


_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act")


def _as_eos(eos):
    if isinstance(eos, list):
        return tuple(eos) if len(eos) != 1 else eos[0]
    return eos


def _detect_family(hf: dict) -> str:
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return model_type
    for family, archs in FAMILIES.items():
        if any(a in archs for a in hf.get("architectures") or ()):
            return family
    raise ValueError(
        f"Unsupported model family: model_type={model_type!r}, architectures={hf.get('architectures')}. "
        f"Supported model_type values: {sorted(FAMILIES)}."
    )
