"""Tunix's own sampler (`tunix.generate.sampler.Sampler`) serving greedy generations on request.

Run by the Tunix venv's python (google-tunix 0.1.7 pins its own jax), as the `common.TunixPeer`
of benchmarks/sampler_vs_tunix.py, which alternates these runs with bridge's and prints both:

    /work/tunix-venv/bin/python benchmarks/sampler_tunix_worker.py --model DIR --prompt-len 32 --new-tokens 64

- Model: `common.tunix_qwen3`: Tunix's Qwen3 (`tunix.models.qwen3`), config read from
  DIR/config.json, weights loaded by Tunix's safetensors loader, float32.
- Sampler: `Sampler(model, TokenIds(), CacheConfig(cache_size=prompt + new tokens, ...))`,
  called as `sampler(prompts, max_generation_steps=new_tokens, max_prompt_length=prompt length,
  temperature=0.0, echo=False)`: greedy (`sample_best`, argmax of the last logits), its jitted
  prefill, then its jitted decode `while_loop`.
- Token ids go in directly: the sampler tokenizes each input with `tokenizer.encode`, and
  `TokenIds.encode` returns the ids it is given. bos_id is None (no token is prepended);
  pad_id = -1 and eos_id = -2 are ids the model never emits and the prompts never hold, so no
  prompt position is masked as padding, no generated token is masked as padding in the decode
  attention, and no row stops early: every row gets exactly `--new-tokens` tokens (checked).

Protocol (`common.serve`, one JSON object per line): prints {"ready": true, "versions": ...} once
the model is loaded; then for each line {"prompts": [[id, ...], ...]} on stdin it runs the sampler
once on those prompts, timed end to end (Python lists in, tokens on the host out:
`SamplerOutput.tokens`), and prints {"tokens": [[...]], "wall_s": ..., "cpu_s": ...} (cpu_s: this
process's CPU seconds).
"""

from __future__ import annotations

import argparse
import os

import common

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder with config.json and model.safetensors")
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    args = parser.parse_args()
    from tunix.generate import sampler as sampler_lib

    config, model = common.tunix_qwen3(args.model)
    cache = sampler_lib.CacheConfig(cache_size=args.prompt_len + args.new_tokens, num_layers=config.num_layers,
                                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    sampler = sampler_lib.Sampler(model, TokenIds(), cache)

    def generate(message: dict) -> dict:
        prompts = message["prompts"]
        if any(len(p) != args.prompt_len for p in prompts):
            raise ValueError(f"every prompt must have {args.prompt_len} tokens (no padding in this comparison)")
        tokens, wall, cpu = common.timed(lambda: np.stack(sampler(
            prompts, max_generation_steps=args.new_tokens, max_prompt_length=args.prompt_len, temperature=0.0,
            echo=False).tokens))
        if tokens.shape != (len(prompts), args.new_tokens):
            raise RuntimeError(f"Tunix returned tokens of shape {tokens.shape}, expected "
                               f"{(len(prompts), args.new_tokens)}")
        return dict(tokens=tokens.tolist(), wall_s=wall, cpu_s=cpu)

    common.serve(generate, versions=common.tunix_versions())


if __name__ == "__main__":
    main()
