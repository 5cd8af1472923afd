"""Tunix's own sampler (`tunix.generate.sampler.Sampler`) serving greedy generations on request.

Run by the Tunix venv's python (google-tunix 0.1.7 pins its own jax), as a subprocess of
benchmarks/sampler_vs_tunix.py, which alternates these runs with bridge's and prints both:

    /work/tunix-venv/bin/python benchmarks/sampler_tunix_worker.py --model DIR --new-tokens 64

- Model: Tunix's Qwen3 (`tunix.models.qwen3`), config read from DIR/config.json, weights loaded
  by Tunix's safetensors loader (`params.create_model_from_safe_tensors`), float32.
- Sampler: `Sampler(model, TokenIds(), CacheConfig(cache_size=prompt + new tokens, ...))`,
  called as `sampler(prompts, max_generation_steps=new_tokens, max_prompt_length=prompt length,
  temperature=0.0, echo=False)`: greedy (`sample_best`, argmax of the last logits), its jitted
  prefill, then its jitted decode `while_loop`.
- Token ids go in directly: the sampler tokenizes each input with `tokenizer.encode`, and
  `TokenIds.encode` returns the ids it is given. bos_id is None (no token is prepended);
  pad_id = -1 and eos_id = -2 are ids the model never emits and the prompts never hold, so no
  prompt position is masked as padding, no generated token is masked as padding in the decode
  attention, and no row stops early: every row gets exactly `--new-tokens` tokens (checked).

Protocol (one JSON object per line): prints {"ready": true, ...} once the model is loaded; then
for each line {"prompts": [[id, ...], ...]} on stdin it runs the sampler once on those prompts,
timed end to end (Python lists in, tokens on the host out: `SamplerOutput.tokens`), and prints
{"tokens": [[...]], "wall_s": ..., "cpu_s": ...} (cpu_s: this process's CPU seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

PAD_ID = -1  # never a prompt token, never generated: nothing is masked as padding
EOS_ID = -2  # never generated: no row stops before max_generation_steps


class TokenIds:
    """The tokenizer interface Tunix's TokenizerAdapter accepts, for inputs that are token ids."""

    def encode(self, ids, **kwargs) -> list[int]:
        return [int(i) for i in ids]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(i) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return EOS_ID

    def pad_id(self) -> int:
        return PAD_ID


def tunix_model(model_dir: str):
    from tunix.models.qwen3 import model as qwen3_model, params as qwen3_params

    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    rope_theta = hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta")  # transformers 4 / 5
    if rope_theta is None:
        raise ValueError(f"no rope_theta in {model_dir}/config.json")
    config = qwen3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope_theta),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"],
        dtype=jnp.float32, param_dtype=jnp.float32)
    return config, qwen3_params.create_model_from_safe_tensors(model_dir, config, dtype=jnp.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder with config.json and model.safetensors")
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    args = parser.parse_args()
    from importlib.metadata import version

    from tunix.generate import sampler as sampler_lib

    config, model = tunix_model(args.model)
    cache = sampler_lib.CacheConfig(cache_size=args.prompt_len + args.new_tokens, num_layers=config.num_layers,
                                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    sampler = sampler_lib.Sampler(model, TokenIds(), cache)
    print(json.dumps(dict(ready=True, versions=f"google-tunix {version('google-tunix')}, jax {jax.__version__}, "
                                              f"flax {version('flax')}")), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        prompts = json.loads(line)["prompts"]
        if any(len(p) != args.prompt_len for p in prompts):
            raise ValueError(f"every prompt must have {args.prompt_len} tokens (no padding in this comparison)")
        start, start_cpu = time.perf_counter(), time.process_time()
        out = sampler(prompts, max_generation_steps=args.new_tokens, max_prompt_length=args.prompt_len,
                      temperature=0.0, echo=False)
        tokens = np.stack(out.tokens)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if tokens.shape != (len(prompts), args.new_tokens):
            raise RuntimeError(f"Tunix returned tokens of shape {tokens.shape}, expected "
                               f"{(len(prompts), args.new_tokens)}")
        print(json.dumps(dict(tokens=tokens.tolist(), wall_s=wall, cpu_s=cpu)), flush=True)


if __name__ == "__main__":
    main()
