"""Greedy decoding speed: bridge.sampling.generate vs Tunix's sampler, same weights.

The model and prompts of benchmarks/sampler_vs_hf.py (common.write_hf_model: a random Qwen3-shaped
model, 4 layers, hidden 256, MLP 768, 4 heads / 2 kv heads of 64, vocab 32000, tied embeddings,
written by transformers as safetensors; PROMPT_LEN random tokens per row from the same seeded
generator). Greedy, exactly NEW_TOKENS new tokens per row (no eos), CPU float32, batch 1, 8, 32.

Tunix (google-tunix 0.1.7) pins its own jax, so it lives in its own venv (/work/tunix-venv) and
runs in a subprocess (common.TunixPeer), benchmarks/sampler_tunix_worker.py: Tunix's Qwen3 loaded
by Tunix's safetensors loader and driven through `tunix.generate.sampler.Sampler` (its jitted
prefill and decode while_loop, greedy), token ids fed through a minimal tokenizer adapter; see
that file.

Each thread setting runs in its own pair of processes, because XLA reads its thread settings
once: "all" = XLA's default thread pool on both sides, "1" = both processes pinned to the same
single core with XLA's thread pool off (the Tunix process inherits the environment and the
affinity). Each side is warmed up (compiled) once per batch size, the warm-up outputs give the
agreement (share of generated tokens equal on both sides), then the two are timed alternately,
one call each per round, end to end (Python lists of ids in, tokens on the host out); the best
wall time of each gives new tokens/s, and with one thread also the ratio of best process CPU
times (common.compare_samplers). Writes benchmarks/results/sampler_vs_tunix.md.

    .venv/bin/python benchmarks/sampler_vs_tunix.py                 # threads "all" and "1"
    .venv/bin/python benchmarks/sampler_vs_tunix.py --threads 1
"""

from __future__ import annotations

import os
import sys

import common


def worker(path: str, threads: str) -> dict:
    """Times bridge here and Tunix in its subprocess, alternately; returns the rows."""
    load_before = os.getloadavg()[0]
    tunix = common.TunixPeer("sampler_tunix_worker.py", "--model", path, "--prompt-len", str(common.PROMPT_LEN),
                             "--new-tokens", str(common.NEW_TOKENS))  # loads while bridge loads
    import jax

    ours = common.bridge_sampler(path)
    tunix_versions = tunix.ready()["versions"]

    def theirs(prompts):
        res = tunix.request(prompts=prompts)
        return res["tokens"], res["wall_s"], res["cpu_s"]

    rows = common.compare_samplers(ours, theirs, "Tunix", threads)
    tunix.close()
    return dict(threads=threads, rows=rows, load=common.load_note(load_before),
                versions=f"bridge: jax {jax.__version__}; Tunix venv: {tunix_versions}")


def report(results: list[dict]) -> None:
    p, n = common.PROMPT_LEN, common.NEW_TOKENS
    common.write_sampler_report(
        "sampler_vs_tunix", "Sampler vs Tunix's sampler (CPU, float32)", "Tunix",
        "Tunix: `tunix.generate.sampler.Sampler` (temperature 0 = its greedy `sample_best`, "
        f"`CacheConfig(cache_size={p + n})`, `max_prompt_length={p}`, token ids fed through a minimal "
        "tokenizer adapter, Tunix's Qwen3 and safetensors loader), in its own venv and process "
        "(`benchmarks/sampler_tunix_worker.py`).",
        ["Not matched, by design of each sampler (the timings include these differences): bridge's prefill "
         "projects only the last prompt position onto the vocabulary, Tunix's Qwen3 has no "
         f"`decode_only_last_token` and projects all prompt positions; bridge runs prefill + {n - 1} decode "
         f"steps, Tunix's decode `while_loop` runs until its step counter reaches prompt + {n}, i.e. prefill + "
         f"{n} decode steps, the last token being written past its buffer and dropped; bridge also returns each "
         "token's log-probability (Tunix's is off by default, left off here); bridge's output buffers hold only "
         "the new tokens, Tunix's token buffer holds prompt + new tokens and its decode-step attention mask is "
         "rebuilt from it every step."], results)


def main() -> None:
    def tunix_venv_exists():
        if missing := common.tunix_venv_missing():
            sys.exit(missing)

    common.run_sampler_benchmark(__doc__.split("\n")[0], worker, report, precheck=tunix_venv_exists)


if __name__ == "__main__":
    main()
