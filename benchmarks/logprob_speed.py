"""Wall time of bridge.kernels.logprobs, reference vs chunked, at a size that runs on a laptop CPU.

N = B * T = 4 * 512 tokens, D = 512, V = 32,000, float32: `jax.jit` of the token_logprobs
forward, its gradient wrt (hidden, lm_head), and the gradient of the full-vocabulary JSD
wrt the student. Each function is compiled and run once, then timed REPEATS times (median,
`block_until_ready`); the 1-minute load average is recorded, since on a shared machine
other jobs slow both columns alike. The reference materializes [N, V] logits (0.25 GiB
here), so this is the size range where the reference is still affordable; above it only
chunked fits.
Writes benchmarks/results/logprob_speed.md.

    .venv/bin/python benchmarks/logprob_speed.py
"""
import os
import statistics

import common
import jax
import jax.numpy as jnp

from bridge.kernels.logprobs import chunked, token_divergence, token_logprobs

BATCH, LENGTH, WIDTH, VOCAB = 4, 512, 512, 32_000
REPEATS = 3


def cases(implementation):
    def logp(hidden, head, targets):
        return token_logprobs(hidden, head, targets, implementation=implementation)

    def logp_loss(hidden, head, targets):
        return jnp.sum(logp(hidden, head, targets))

    def jsd_loss(hidden, head, targets):
        return jnp.sum(token_divergence(hidden, head, hidden[..., ::-1], head[::-1], "jsd",
                                        implementation=implementation))

    return [("token_logprobs forward", logp),
            ("token_logprobs grad (hidden, head)", jax.grad(logp_loss, argnums=(0, 1))),
            ("token_divergence jsd grad (student)", jax.grad(jsd_loss, argnums=(0, 1)))]


def median_seconds(fn, args):
    return statistics.median(common.wall_times(jax.jit(fn), *args, repeats=REPEATS))


def main():
    load_before = os.getloadavg()[0]
    keys = jax.random.split(jax.random.key(0), 3)
    args = (jax.random.normal(keys[0], (BATCH, LENGTH, WIDTH)),
            0.05 * jax.random.normal(keys[1], (WIDTH, VOCAB)),
            jax.random.randint(keys[2], (BATCH, LENGTH), 0, VOCAB))
    rows = []
    for (name, reference_fn), (_, chunked_fn) in zip(cases("reference"), cases("chunked")):
        reference_s = median_seconds(reference_fn, args)
        chunked_s = median_seconds(chunked_fn, args)
        rows.append((name, reference_s, chunked_s))
        print(f"{name:40s} reference {reference_s:.3f} s  chunked {chunked_s:.3f} s", flush=True)
    intro = [f"N = {BATCH}*{LENGTH} = {BATCH * LENGTH} tokens, D = {WIDTH}, V = {VOCAB}, float32; "
             f"jitted, median of {REPEATS} runs after one warm-up run. Chunked at its default chunk "
             f"size ({chunked.default_chunk_size(BATCH * LENGTH, VOCAB)} tokens)."]
    lines = ["| function | reference (s) | chunked (s) | chunked / reference |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {reference_s:.3f} | {chunked_s:.3f} | {chunked_s / reference_s:.2f} |"
              for name, reference_s, chunked_s in rows]
    common.write_report("logprob_speed", "bridge.kernels.logprobs: wall time, reference vs chunked", intro, lines,
                        common.jax_versions(), common.load_note(load_before))


if __name__ == "__main__":
    main()
