"""Greedy decoding speed: bridge.sampling.generate vs transformers `generate`, same weights.

A random Qwen3-shaped model (4 layers, hidden 256, MLP 768, 4 heads / 2 kv heads of 64,
vocab 32000, tied embeddings) is built with transformers, saved as safetensors and loaded by
both. Same prompts (PROMPT_LEN random tokens per row), greedy, exactly NEW_TOKENS new tokens
(no eos: transformers gets min_new_tokens), CPU float32, batch 1, 8 and 32.

Each thread setting runs in its own process, because XLA reads its thread settings once:
"all" = every core for both (torch.set_num_threads(cores), XLA's default thread pool), and
"1" = the process pinned to one core with one thread on each side. Each side is warmed up
(compiled) once, then the two are timed alternately, end to end (Python lists / tensors in,
tokens on the host out), REPEATS times; the best wall time of each is reported as new
tokens/s, and with one thread also the ratio of best process CPU times, the figure least
disturbed by other work on a shared machine (the load average is recorded too). Writes
benchmarks/results/sampler_vs_hf.md.

    .venv/bin/python benchmarks/sampler_vs_hf.py                 # threads "all" and "1"
    .venv/bin/python benchmarks/sampler_vs_hf.py --threads all
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

BATCHES = (1, 8, 32)
PROMPT_LEN = 32
NEW_TOKENS = 64
REPEATS = 5
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "sampler_vs_hf.md")

MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
             rope_theta=1_000_000.0, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)


def build_model(path: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**MODEL)).eval()
    with torch.no_grad():  # wider than the default init so greedy paths are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)


def worker(path: str, threads: str) -> dict:
    """Times both samplers in this process with the given thread setting; returns the rows."""
    if threads == "1":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import torch
    import transformers

    sys.path.insert(0, ROOT)
    from bridge import models, sampling

    torch.set_num_threads(1 if threads == "1" else os.cpu_count())
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = models.load_hf(path)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    rows = []
    for batch in BATCHES:
        prompts = rng.integers(0, MODEL["vocab_size"], (batch, PROMPT_LEN)).tolist()
        ids = torch.tensor(prompts)

        def ours():
            out = sampling.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
            return np.asarray(out.tokens)

        def theirs():
            with torch.inference_mode():
                out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False, pad_token_id=0)
            return out[:, PROMPT_LEN:].numpy()

        agree = float(np.mean(ours() == theirs()))  # also the warm-up (compilation) run
        wall, cpu = {ours: [], theirs: []}, {ours: [], theirs: []}
        for _ in range(REPEATS):
            for fn in (ours, theirs):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[fn].append(time.perf_counter() - start)
                cpu[fn].append(time.process_time() - start_cpu)
        tokens = batch * NEW_TOKENS
        row = dict(batch=batch, ours=tokens / min(wall[ours]), hf=tokens / min(wall[theirs]), agree=agree,
                   cpu_ratio=min(cpu[theirs]) / min(cpu[ours]) if threads == "1" else None)
        rows.append(row)
        print(f"threads {threads}, batch {batch}: bridge {row['ours']:.0f} tok/s, transformers {row['hf']:.0f} tok/s, "
              f"ratio {row['ours'] / row['hf']:.2f}x, same greedy tokens {agree:.1%}", file=sys.stderr, flush=True)
    return dict(threads=threads, rows=rows, load=(load_before, os.getloadavg()),
                versions=f"jax {jax.__version__}, torch {torch.__version__}, "
                         f"transformers {transformers.__version__}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ratio_table(results: list[dict], peer_key: str, peer_name: str) -> tuple[list[str], list[str], str]:
    """(table lines, load-average notes, machine line) of the worker results, bridge vs one peer."""
    table = [f"| threads | batch | bridge tok/s | {peer_name} tok/s | ratio | CPU-time ratio | same greedy tokens |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    loads = []
    for res in results:
        threads = f"{os.cpu_count()} (all)" if res["threads"] == "all" else res["threads"]
        for r in res["rows"]:
            cpu_ratio = "-" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}x"
            table.append(f"| {threads} | {r['batch']} | {r['ours']:.0f} | {r[peer_key]:.0f} | "
                         f"{r['ours'] / r[peer_key]:.2f}x | {cpu_ratio} | {r['agree']:.1%} |")
        loads.append(f"threads {threads}: {res['load'][0][0]:.1f} before, {res['load'][1][0]:.1f} after")
    machine = (f"{cpu_name()}, {os.cpu_count()} cores; {platform.system()} {platform.release()}, "
               f"Python {platform.python_version()}, {results[0]['versions']}")
    return table, loads, machine


def report(results: list[dict]) -> str:
    table, loads, machine = ratio_table(results, "hf", "transformers")
    return "\n".join([
        "# Sampler vs transformers generate (CPU, float32)", "",
        f"Qwen3-shaped random model: {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"MLP {MODEL['intermediate_size']}, {MODEL['num_attention_heads']} heads / "
        f"{MODEL['num_key_value_heads']} kv heads x {MODEL['head_dim']}, vocab {MODEL['vocab_size']}, tied "
        f"embeddings, the same safetensors loaded by both. Greedy, {PROMPT_LEN}-token random prompts, exactly "
        f"{NEW_TOKENS} new tokens per row. New tokens per second, end to end, best of {REPEATS} alternating "
        "runs after one warm-up (compilation) run; ratio = bridge / transformers. With one thread each side "
        "is pinned to one core, and the CPU-time ratio (process CPU seconds, best of the same runs) "
        "is the comparison least affected by other processes on a shared machine. With all threads on a "
        "machine whose load exceeds its cores, torch's OpenMP threads spin-wait and transformers slows down "
        "many times, so read those rows with the load average below.", "",
        f"Machine: {machine}.", f"1-minute load average (shared machine): {'; '.join(loads)}.", "",
        "Command: `.venv/bin/python benchmarks/sampler_vs_hf.py`", "",
        *table, ""])


def write_report(text: str, path: str) -> None:
    """Prints the report and writes it to `path` (benchmarks/results/...)."""
    print("\n" + text)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def run_benchmark(script: str, worker_fn, report_fn, results_path: str, precheck=None) -> None:
    """The shared driver of the sampler benchmarks: `--worker` runs one thread setting in this
    process; otherwise the model is built once and each setting runs in its own subprocess."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="all,1", help="comma-separated: 'all' and/or '1'")
    parser.add_argument("--worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_fn(args.worker, args.threads)))
        return
    settings = args.threads.split(",")
    if any(s not in ("all", "1") for s in settings):
        parser.error(f"--threads takes 'all' and/or '1'; got {args.threads!r}")
    if precheck is not None:
        precheck()
    with tempfile.TemporaryDirectory() as path:
        build_model(path)
        results = []
        for threads in settings:
            proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", path, "--threads", threads],
                                  stdout=subprocess.PIPE, check=True, text=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    write_report(report_fn(results), results_path)


def main() -> None:
    run_benchmark(__file__, worker, report, RESULTS)


if __name__ == "__main__":
    main()
