"""Slot refill (continuous batching) vs the static sampler on heavy-tailed rollout lengths.

    .venv/bin/python benchmarks/rollout_lengths.py [--shape=small|toy] [--prompts=64] [--n=8]
        [--median=64] [--p99=512] [--max-new=512] [--slots=64,128] [--chunk=32] [--rounds=3]

`--prompts` x `--n` rows; row r stops at a pre-drawn length L_r (log-normal with the given
median and 99th percentile, clipped to [1, max_new]), forced by a benchmark-only logits
processor (`SamplingConfig.processor`: eos is impossible before step L_r - 1 and certain at
it), tokens otherwise sampled at temperature 1 with one seed. The static side is
`sampling.generate` over every row at once (one batch, as a stage with sample_batch_size 0
samples: every row decodes until the longest has finished); each refill side is
`generate(refill=slots)`. Both sides take turns (`common.alternate`), after one untimed call
each that compiles. Useful tokens per second = sum of the completion lengths / wall seconds
(Python lists in, tokens on the host out). Every side's tokens, masks and finish reasons are
checked equal to the static side's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SHAPES = {
    "small": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=32),
    "toy": common.QWEN3_TOY,
    "medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_layers=8, num_heads=8,
                   num_kv_heads=8, head_dim=128),
}
EOS = 1


def draw_lengths(rows: int, median: float, p99: float, max_new: int, seed: int):
    import numpy as np

    sigma = math.log(p99 / median) / 2.3263478740408408  # z of the 99th percentile
    lengths = np.exp(np.log(median) + sigma * np.random.default_rng(seed).standard_normal(rows))
    return np.clip(np.round(lengths), 1, max_new).astype(np.int32)


def forced_eos(lengths):
    """The benchmark's processor: row r's token L_r - 1 is eos, earlier tokens are never eos."""
    import jax.numpy as jnp

    table = jnp.asarray(lengths)

    def processor(logits, rows, steps):
        last = table[jnp.minimum(rows, table.shape[0] - 1)] - 1
        vocab = jnp.arange(logits.shape[-1])[None]
        at = (steps == last)[:, None]
        logits = jnp.where(at, jnp.where(vocab == EOS, 0.0, -jnp.inf), logits)
        return jnp.where(~at & (vocab == EOS), -jnp.inf, logits)

    return processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--median", type=float, default=64)
    parser.add_argument("--p99", type=float, default=512)
    parser.add_argument("--max-new", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt lengths uniform in [len/2, len]")
    parser.add_argument("--slots", default="64,128")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--precision", default="", help="jax_default_matmul_precision (e.g. highest: no TF32 on GPUs)")
    parser.add_argument("--name", default="rollout_lengths")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]

    import jax
    import numpy as np

    if args.precision:
        jax.config.update("jax_default_matmul_precision", args.precision)
    from flax import nnx

    from bridge import sampling
    from bridge.models import Decoder
    from bridge.sampling import sampler as sampler_lib

    cfg = common.model_config(SHAPES[args.shape], dtype=args.dtype)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(2, cfg.vocab_size, size=rng.integers(args.prompt_len // 2, args.prompt_len + 1)))
               for _ in range(args.prompts)]
    rows = args.prompts * args.n
    lengths = draw_lengths(rows, args.median, args.p99, args.max_new, seed=2)
    processor = forced_eos(lengths)
    kw = dict(max_new_tokens=args.max_new, temperature=1.0, eos_ids=(EOS,), n=args.n, seed=0)

    stats = {}

    def run(refill: int):
        def side():
            start = time.perf_counter()
            out = sampling.generate(model, prompts, refill=refill, refill_chunk=args.chunk, processor=processor,
                                    **kw)
            host = jax.device_get((out.tokens, out.mask, out.finish_reason, out.lengths))
            wall = time.perf_counter() - start
            if refill:
                stats[refill] = next(v.last_stats for k, v in sampler_lib._SAMPLERS.items()
                                     if k[0] == "refill" and k[5] == min(refill, rows) and hasattr(v, "last_stats"))
            return wall, host
        return side

    slots = [int(s) for s in args.slots.split(",") if s]
    sides = {"static": run(0), **{f"refill {s}": run(s) for s in slots}}
    compile_s = {}
    for name, side in sides.items():
        compile_s[name] = side()[0]
    results = common.alternate(sides, args.rounds)
    want = results["static"][0][1]
    assert np.array_equal(want[3], np.minimum(lengths, args.max_new)), "the processor did not force the lengths"
    useful = int(want[3].sum())
    static_best = min(t for t, _ in results["static"])
    lines = ["| sampler | slots | best wall s | useful tokens/s | vs static | same outputs | equal tokens | first call s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        best = min(t for t, _ in res)
        same = all(all(np.array_equal(a, b) for a, b in zip(host, want)) for _, host in res)
        # fraction of the useful (masked) tokens equal to the static side's, worst round
        equal = min(float(np.sum((host[0] == want[0]) & want[1])) / useful for _, host in res)
        width = rows if name == "static" else name.split()[1]
        lines.append(f"| {name.split()[0]} | {width} | {best:.3f} | {useful / best:,.0f} | "
                     f"{static_best / best:.2f}x | {same} | {equal:.2%} | {compile_s[name]:.1f} |")
        print(f"{name}: best {best:.3f} s, {useful / best:,.0f} useful tokens/s, ratio {static_best / best:.2f}x, "
              f"same outputs {same}, equal tokens {equal:.2%}")
    lines += ["", f"Static decode steps: {int(want[3].max())} (the longest row) x {rows} rows = "
              f"{int(want[3].max()) * rows:,} row-steps for {useful:,} useful tokens."]
    for s in slots:
        st = stats[s]
        lines.append(f"Refill {s} slots: {st['steps']} decode steps x {s} slots = {st['steps'] * s:,} row-steps; "
                     f"{st['rounds']} decode rounds, {st['refills']} refill prefills, {st['shifts']} cache shifts "
                     f"(host round trips: one per round).")
        print(lines[-1])
    q = np.percentile(lengths, [50, 90, 99])
    intro = [f"Useful (non-padding) tokens per second of slot refill (`generate(refill=slots)`) against the static "
             f"sampler (`generate`, all {rows} rows in one batch) on {args.prompts} prompts x {args.n} samples whose "
             f"lengths are forced by a benchmark-only processor (eos at a pre-drawn length per row): log-normal, "
             f"median {args.median:g}, p99 {args.p99:g}, clipped to max_new_tokens {args.max_new}; drawn lengths "
             f"p50/p90/p99/max {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}/{lengths.max()}, sum {useful}. Temperature 1, one "
             f"seed; refill rounds of at most {args.chunk} decode steps. Best of {args.rounds} alternating rounds "
             f"after a first (compiling) call per side.",
             f"Model: {common.describe_model(cfg)}; {args.dtype}, matmul precision "
             f"{args.precision or 'default'}; prompts of {args.prompt_len // 2}-"
             f"{args.prompt_len} tokens."]
    common.write_report(args.name, "Slot refill vs static sampler, heavy-tailed lengths", intro, lines,
                        common.jax_versions(), common.load_note(load0))


if __name__ == "__main__":
    main()
