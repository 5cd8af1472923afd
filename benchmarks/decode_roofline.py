"""Batch-1 greedy decoding against the memory-bandwidth roofline of the device it runs on.

At batch 1 a decode step reads every weight once (the tied head: the whole embedding) plus
the KV cache written so far, and does little else, so its speed is bounded by

    roofline tokens/s = bandwidth / (weight bytes + mean KV-cache bytes read per step)

with the bandwidth measured here as the best of several on-device copies of a buffer as large
as the weights (bytes read + bytes written per second), so it comes from the same level of
the memory hierarchy the weights live in: HBM on an accelerator, possibly a large last-level
cache on a CPU. The model is a random Qwen3 of the chosen shape
(`qwen3-1.7b`: common.QWEN3_1_7B, 28 layers, hidden 2048, MLP 6144, 16 heads / 8 kv heads x
128, vocab 151,936, tied; `toy`: common.QWEN3_TOY, the 4-layer d-256 model of the sampler and
train-step benchmarks), built directly in JAX (no checkpoint needed), decoding through
`bridge.sampling.generate`.

    .venv/bin/python benchmarks/decode_roofline.py                       # qwen3-1.7b, bfloat16
    .venv/bin/python benchmarks/decode_roofline.py --shape=toy --dtype=float32

Writes benchmarks/results/decode_roofline_<platform>_<shape>.md. The issue's goal on an
accelerator is 60% of the roofline or more. On a CPU the figure is not a bound: XLA:CPU runs
the elementwise copy on one thread far below the memory system's bandwidth (5 GB/s on the
project's 2-core machine, where decoding the toy model streams its weights at ~30 GB/s).
"""

from __future__ import annotations

import argparse
import os

import common

SHAPES = {"qwen3-1.7b": common.QWEN3_1_7B, "toy": common.QWEN3_TOY}


def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes moved per second (read + write) by the best of `repeats` on-device copies."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    return 2 * x.nbytes / min(common.wall_times(jax.jit(lambda x: x + 1.0), x, repeats=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bridge import models, sampling

    dtype = jnp.dtype(args.dtype)
    cfg = common.model_config(SHAPES[args.shape], dtype=dtype, param_dtype=dtype)
    model = models.Decoder(cfg, rngs=nnx.Rngs(0))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # keys + values of every layer, averaged over the slots a step reads (prompt .. prompt + new)
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    kv_bytes = per_slot * (args.prompt_len + args.new_tokens / 2)
    bandwidth = copy_bandwidth(weight_bytes)
    roofline = bandwidth / (weight_bytes + kv_bytes)

    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prompt_len)).tolist()
    run = lambda: np.asarray(sampling.generate(model, prompt, args.new_tokens, 0.0).tokens)  # noqa: E731
    tokens_per_s = args.new_tokens / min(common.wall_times(run, repeats=args.repeats))

    platform = jax.devices()[0].platform
    common.write_report(
        f"decode_roofline_{platform}_{args.shape}",
        f"Batch-1 decode vs the bandwidth roofline ({platform}, {args.shape}, {args.dtype})",
        [f"Random Qwen3 `{args.shape}` ({common.describe_model(cfg)}; {weight_bytes / 1e9:.3f} GB of weights), "
         f"greedy, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, end to end through "
         f"`sampling.generate` on one device, best of {args.repeats} after a compiling run."],
        ["| copy bandwidth (GB/s) | bytes per step (GB) | roofline tok/s | measured tok/s | fraction of roofline |",
         "|---:|---:|---:|---:|---:|",
         f"| {bandwidth / 1e9:.1f} | {(weight_bytes + kv_bytes) / 1e9:.4f} | {roofline:.0f} | {tokens_per_s:.0f} | "
         f"{tokens_per_s / roofline:.0%} |",
         *(["", "On CPU the copy is not bandwidth-bound (see the script's docstring): not a roofline."]
           if platform == "cpu" else [])],
        common.jax_versions(), common.load_note(load_before))

if __name__ == "__main__":
    main()
