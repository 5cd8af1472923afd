"""Greedy decoding speed: bridge.sampling.generate vs Tunix's sampler, same weights.

The model and prompts of benchmarks/sampler_vs_hf.py (its `build_model`: a random Qwen3-shaped
model, 4 layers, hidden 256, MLP 768, 4 heads / 2 kv heads of 64, vocab 32000, tied embeddings,
written by transformers as safetensors; PROMPT_LEN random tokens per row from the same seeded
generator). Greedy, exactly NEW_TOKENS new tokens per row (no eos), CPU float32, batch 1, 8, 32.

Tunix (google-tunix 0.1.7) pins its own jax, so it lives in its own venv (/work/tunix-venv) and
runs in a subprocess, benchmarks/sampler_tunix_worker.py: Tunix's Qwen3 loaded by Tunix's
safetensors loader and driven through `tunix.generate.sampler.Sampler` (its jitted prefill and
decode while_loop, greedy), token ids fed through a minimal tokenizer adapter; see that file.

Each thread setting runs in its own pair of processes, because XLA reads its thread settings
once: "all" = XLA's default thread pool on both sides, "1" = both processes pinned to the same
single core with XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
(as sampler_vs_hf.py does; the Tunix process inherits the environment and the affinity). Each
side is warmed up (compiled) once per batch size, the warm-up outputs give the agreement (share
of generated tokens equal on both sides), then the two are timed alternately, one call each per
round, end to end (Python lists of ids in, tokens on the host out), REPEATS rounds; the best
wall time of each gives new tokens/s, and with one thread also the ratio of best process CPU
times. Writes benchmarks/results/sampler_vs_tunix.md.

    .venv/bin/python benchmarks/sampler_vs_tunix.py                 # threads "all" and "1"
    .venv/bin/python benchmarks/sampler_vs_tunix.py --threads 1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

from sampler_vs_hf import (BATCHES, MODEL, NEW_TOKENS, PROMPT_LEN, REPEATS, ratio_table,  # noqa: E402
                           run_benchmark)

RESULTS = os.path.join(ROOT, "benchmarks", "results", "sampler_vs_tunix.md")
TUNIX_PYTHON = "/work/tunix-venv/bin/python"
TUNIX_WORKER = os.path.join(BENCH, "sampler_tunix_worker.py")
CREATE_TUNIX_VENV = "python3 -m venv /work/tunix-venv && /work/tunix-venv/bin/pip install google-tunix==0.1.7"


class TunixPeer:
    """sampler_tunix_worker.py in the Tunix venv: one sampler call per `generate` call."""

    def __init__(self, model_dir: str):
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([TUNIX_PYTHON, TUNIX_WORKER, "--model", model_dir, "--prompt-len",
                                      str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = [x for x in self.log.read().strip().splitlines() if x.strip()][-5:]
            raise RuntimeError(f"sampler_tunix_worker.py stopped (exit {self.proc.returncode}); stderr ends: "
                               + " / ".join(tail))
        return json.loads(line)

    def ready(self) -> str:
        return self._reply()["versions"]

    def generate(self, prompts: list[list[int]]) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def worker(path: str, threads: str) -> dict:
    """Times bridge here and Tunix in its subprocess, alternately; returns the rows."""
    if threads == "1":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    tunix = TunixPeer(path)  # inherits XLA_FLAGS and the affinity; loads while bridge loads
    import jax
    import numpy as np

    sys.path.insert(0, ROOT)
    from bridge import models, sampling

    model = models.load_hf(path)
    tunix_versions = tunix.ready()
    rng = np.random.default_rng(0)  # the prompts of sampler_vs_hf.py
    load_before = os.getloadavg()
    rows = []
    for batch in BATCHES:
        prompts = rng.integers(0, MODEL["vocab_size"], (batch, PROMPT_LEN)).tolist()

        def ours() -> tuple[np.ndarray, float, float]:
            start, start_cpu = time.perf_counter(), time.process_time()
            out = sampling.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
            tokens = np.asarray(out.tokens)
            return tokens, time.perf_counter() - start, time.process_time() - start_cpu

        def theirs() -> tuple[np.ndarray, float, float]:
            res = tunix.generate(prompts)
            return np.asarray(res["tokens"]), res["wall_s"], res["cpu_s"]

        warm = {fn: fn()[0] for fn in (ours, theirs)}  # compilation runs
        for tokens in warm.values():
            assert tokens.shape == (batch, NEW_TOKENS), tokens.shape
        agree = float(np.mean(warm[ours] == warm[theirs]))
        wall, cpu = {ours: [], theirs: []}, {ours: [], theirs: []}
        for _ in range(REPEATS):
            for fn in (ours, theirs):
                _, w, c = fn()
                wall[fn].append(w)
                cpu[fn].append(c)
        tokens = batch * NEW_TOKENS
        row = dict(batch=batch, ours=tokens / min(wall[ours]), tunix=tokens / min(wall[theirs]), agree=agree,
                   cpu_ratio=min(cpu[theirs]) / min(cpu[ours]) if threads == "1" else None)
        rows.append(row)
        print(f"threads {threads}, batch {batch}: bridge {row['ours']:.0f} tok/s, Tunix {row['tunix']:.0f} tok/s, "
              f"ratio {row['ours'] / row['tunix']:.2f}x, same greedy tokens {agree:.1%}", file=sys.stderr, flush=True)
    tunix.close()
    return dict(threads=threads, rows=rows, load=(load_before, os.getloadavg()),
                versions=f"bridge: jax {jax.__version__}; Tunix venv: {tunix_versions}")


def report(results: list[dict]) -> str:
    table, loads, machine = ratio_table(results, "tunix", "Tunix")
    return "\n".join([
        "# Sampler vs Tunix's sampler (CPU, float32)", "",
        f"Qwen3-shaped random model: {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"MLP {MODEL['intermediate_size']}, {MODEL['num_attention_heads']} heads / "
        f"{MODEL['num_key_value_heads']} kv heads x {MODEL['head_dim']}, vocab {MODEL['vocab_size']}, tied "
        "embeddings, the safetensors of `sampler_vs_hf.py`'s `build_model`, loaded by bridge (`models.load_hf`) "
        "and by Tunix's Qwen3 loader; the same prompts as `sampler_vs_hf.py`. Greedy, "
        f"{PROMPT_LEN}-token random prompts, exactly {NEW_TOKENS} new tokens per row (no eos stop on either "
        "side). Tunix: `tunix.generate.sampler.Sampler` (temperature 0 = its greedy `sample_best`, "
        f"`CacheConfig(cache_size={PROMPT_LEN + NEW_TOKENS})`, `max_prompt_length={PROMPT_LEN}`, token ids fed "
        "through a minimal tokenizer adapter), in its own venv and process "
        "(`benchmarks/sampler_tunix_worker.py`). New tokens per second, end to end (Python lists of ids in, "
        f"tokens on the host out), best of {REPEATS} alternating runs after one warm-up (compilation) run per "
        "batch size; ratio = bridge / Tunix. With one thread both processes are pinned to the same core with "
        "XLA's thread pool off, and the CPU-time ratio (process CPU seconds, best of the same runs) is the "
        "comparison least affected by other processes on a shared machine.", "",
        "Not matched, by design of each sampler (the timings include these differences): bridge's prefill "
        "projects only the last prompt position onto the vocabulary, Tunix's Qwen3 has no "
        "`decode_only_last_token` and projects all prompt positions; bridge runs prefill + "
        f"{NEW_TOKENS - 1} decode steps, Tunix's decode `while_loop` runs until its step counter reaches "
        f"prompt + {NEW_TOKENS}, i.e. prefill + {NEW_TOKENS} decode steps, the last token being written past "
        "its buffer and dropped; bridge also returns each token's log-probability (Tunix's is off by "
        "default, left off here); bridge's output buffers hold only the new tokens, Tunix's token buffer "
        "holds prompt + new tokens and its decode-step attention mask is rebuilt from it every step.", "",
        f"Machine: {machine}.", f"1-minute load average (shared machine): {'; '.join(loads)}.", "",
        "Command: `.venv/bin/python benchmarks/sampler_vs_tunix.py`", "",
        *table, ""])


def main() -> None:
    def tunix_venv_exists():
        if not os.path.exists(TUNIX_PYTHON):
            sys.exit(f"{TUNIX_PYTHON} does not exist; create the Tunix venv first:\n    {CREATE_TUNIX_VENV}")

    run_benchmark(__file__, worker, report, RESULTS, precheck=tunix_venv_exists)


if __name__ == "__main__":
    main()
