"""What the benchmark scripts share, so that each script holds only its measurement.

- Machine and report: `machine`, `jax_versions`, `load_note`, `write_report` (every report in
  benchmarks/results/ has one layout: title, intro, machine, load average, command, tables).
- Timing: `timed`, `wall_times`, `alternate` (the sides of a comparison take turns, one call each
  per round, so that load from other work on a shared machine falls on all of them alike).
- Models: `QWEN3_TOY` (the model of the sampler and train-step benchmarks), `QWEN3_1_7B`,
  `model_config`, `describe_model`.
- The Tunix peer: `TunixPeer` (starts a worker script in the Tunix venv and talks JSON lines with
  it) and, for the workers, `serve`, `tunix_qwen3`, `tunix_versions`.
- The sampler comparison of sampler_vs_hf.py and sampler_vs_tunix.py: `run_sampler_benchmark`,
  `write_hf_model`, `bridge_sampler`, `compare_samplers`, `write_sampler_report`.

Only the standard library is imported at import time: the Tunix venv's workers import this file
too, and the sampler workers set XLA's thread flags before jax is first imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
sys.path.append(ROOT)  # bridge and configs when the package is not installed; last, so it shadows nothing

# ---- machine and report ---------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (`platform.processor()` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(versions: str) -> str:
    """One line: CPU, cores, OS, Python, then `versions` (the libraries and devices measured)."""
    return (f"{cpu_name()}, {os.cpu_count()} cores; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; {versions}")


def jax_versions() -> str:
    """jax's version and the devices it runs on (imports jax)."""
    import jax

    device = jax.devices()[0]
    return f"jax {jax.__version__}, {jax.device_count()} {device.platform} device(s) ({device.device_kind})"


def load_note(before: float) -> str:
    """'1.1 before, 1.3 after': the 1-minute load average `before` (taken at the start) and now."""
    return f"{before:.1f} before, {os.getloadavg()[0]:.1f} after"


def write_report(name: str, title: str, intro: list[str], body: list[str], versions: str, load: str) -> None:
    """Prints the report and writes it to benchmarks/results/<name>.md, in the layout of every
    report: '# title', the `intro` paragraphs, the machine (`machine(versions)`), the load average,
    the command this process runs, then the `body` lines (tables and their notes)."""
    command = shlex.join([".venv/bin/python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]])
    paragraphs = [line for p in intro for line in (p, "")]
    text = "\n".join([f"# {title}", "", *paragraphs, f"Machine: {machine(versions)}.",
                      f"1-minute load average (shared machine): {load}.", "", f"Command: `{command}`", "",
                      *body, ""])
    print("\n" + text)
    path = os.path.join(RESULTS, f"{name}.md")
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


# ---- timing ---------------------------------------------------------------------------------------


def timed(fn, *args) -> tuple:
    """(fn(*args) made ready by `jax.block_until_ready`, its wall seconds, this process's CPU seconds)."""
    import jax

    start, start_cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start, time.process_time() - start_cpu


def wall_times(fn, *args, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn(*args), after one untimed call (the one that compiles)."""
    timed(fn, *args)
    return [timed(fn, *args)[1] for _ in range(repeats)]


def alternate(sides: dict, rounds: int) -> dict[str, list]:
    """Calls every side (a function of no arguments) once per round, in order, `rounds` times;
    returns each side's list of results."""
    results = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            results[name].append(side())
    return results


# ---- models ---------------------------------------------------------------------------------------

QWEN3_TOY = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=64)
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                  num_kv_heads=8, head_dim=128)


def model_config(shape: dict = QWEN3_TOY, **overrides):
    """bridge's `ModelConfig` of a Qwen3 of this shape: qk-norm, tied embeddings, rope theta 1e6,
    RMS-norm eps 1e-6, float32 unless `overrides` says otherwise (imports bridge)."""
    from bridge.models import ModelConfig

    return ModelConfig(**{**dict(family="qwen3", qk_norm=True, tie_word_embeddings=True, rope_theta=1_000_000.0,
                                 rms_norm_eps=1e-6, max_position_embeddings=4096), **shape, **overrides})


def describe_model(cfg) -> str:
    """'4 layers, hidden 256, MLP 768, 4 heads / 2 kv heads x 64, vocab 32000, tied embeddings'."""
    return (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, {cfg.num_heads} "
            f"heads / {cfg.num_kv_heads} kv heads x {cfg.head_dim}, vocab {cfg.vocab_size}"
            + (", tied embeddings" if cfg.tie_word_embeddings else ""))


# ---- the Tunix peer -------------------------------------------------------------------------------

TUNIX_PYTHON = "/work/tunix-venv/bin/python"
CREATE_TUNIX_VENV = "python3 -m venv /work/tunix-venv && /work/tunix-venv/bin/pip install google-tunix==0.1.7"


def tunix_venv_missing() -> str | None:
    """Why no Tunix peer can start (the venv is not there, and how to create it), or None."""
    if os.path.exists(TUNIX_PYTHON):
        return None
    return f"{TUNIX_PYTHON} does not exist; create the Tunix venv: {CREATE_TUNIX_VENV}"


class TunixPeer:
    """A worker script of benchmarks/ run by the Tunix venv's python (google-tunix 0.1.7 pins its
    own jax), started at once so that it loads and compiles while this process does.

    It speaks JSON lines (its half is `serve`): `ready()` waits for the first line it prints and
    returns it, `request(**message)` sends one object and returns the one it answers. A worker
    that stops raises RuntimeError naming its exit status and the end of its stderr; from then on
    `error` holds that message and every call raises it again."""

    def __init__(self, script: str, *args: str):
        self.script, self.error = script, None
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([TUNIX_PYTHON, os.path.join(BENCH, script), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)

    def _reply(self) -> dict:
        """The worker's next JSON line; RuntimeError (kept in `error`) when there is none."""
        line = "" if self.error else self.proc.stdout.readline()
        if not line:
            if self.error is None:
                self.proc.kill()
                self.proc.wait()
                self.log.seek(0)
                tail = [x for x in self.log.read().strip().splitlines() if x.strip()][-5:]
                self.error = f"{self.script} stopped (exit {self.proc.returncode}); stderr ends: {' / '.join(tail)}"
            raise RuntimeError(self.error)
        return json.loads(line)

    def ready(self) -> dict:
        """The worker's first line: it has loaded (and compiled) and waits for requests."""
        return self._reply()

    def request(self, **message) -> dict:
        """Sends `message` as one JSON line; returns the worker's answer."""
        if self.error is None:
            with contextlib.suppress(BrokenPipeError):  # a stopped worker: _reply says why
                self.proc.stdin.write(json.dumps(message) + "\n")
                self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        """Closes the worker's stdin (its `serve` loop ends) and waits for it to exit."""
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait()


def serve(handle, **ready) -> None:
    """A Tunix worker's half of `TunixPeer`: prints `ready` as its first line, then answers each
    JSON object on stdin with the JSON of handle(object), until stdin closes."""
    print(json.dumps(dict(ready, ready=True)), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(handle(json.loads(line))), flush=True)


def tunix_versions(*more: str) -> str:
    """'google-tunix 0.1.7, jax ..., flax ...' and the versions of `more` packages, in this venv."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("google-tunix", "jax", "flax", *more))


def tunix_qwen3(model_dir: str):
    """(config, model): Tunix's own Qwen3 (`tunix.models.qwen3`, float32) of the shape in
    model_dir/config.json, its weights loaded by Tunix's safetensors loader."""
    import jax.numpy as jnp
    from tunix.models.qwen3 import model as qwen3_model, params as qwen3_params

    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    rope_theta = hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta")  # transformers 4 / 5
    if rope_theta is None:
        raise ValueError(f"no rope_theta in {model_dir}/config.json")
    config = qwen3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope_theta), norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf["tie_word_embeddings"], dtype=jnp.float32, param_dtype=jnp.float32)
    return config, qwen3_params.create_model_from_safe_tensors(model_dir, config, dtype=jnp.float32)


# ---- the sampler comparison -----------------------------------------------------------------------

BATCHES = (1, 8, 32)
PROMPT_LEN = 32
NEW_TOKENS = 64
SAMPLER_REPEATS = 5
SINGLE_THREAD_XLA_FLAGS = " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def write_hf_model(path: str) -> None:
    """The sampler benchmarks' model: `QWEN3_TOY` built by transformers (torch seed 0, every matrix
    drawn from N(0, 0.08), wider than the default init so greedy paths are not near-ties) and saved
    as safetensors in `path`."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**model_config().to_hf())).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)


def run_sampler_benchmark(description: str, worker, report, precheck=None) -> None:
    """The command line of the sampler benchmarks. `--threads all,1` (the default): `precheck()`,
    the model built once (`write_hf_model`), each thread setting run in its own process of this
    script (`--worker DIR`, since XLA reads its thread settings once), then `report(results)`.
    `--worker DIR --threads T` pins this process ("1": one core, XLA's thread pool off; a Tunix
    peer started from here inherits both) and prints worker(DIR, T) as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", default="all,1", help="comma-separated: 'all' and/or '1'")
    parser.add_argument("--worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads == "1":
            os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + SINGLE_THREAD_XLA_FLAGS
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        print(json.dumps(worker(args.worker, args.threads)))
        return
    settings = args.threads.split(",")
    if any(s not in ("all", "1") for s in settings):
        parser.error(f"--threads takes 'all' and/or '1'; got {args.threads!r}")
    if precheck is not None:
        precheck()
    with tempfile.TemporaryDirectory() as path:
        write_hf_model(path)
        results = []
        for threads in settings:
            proc = subprocess.run([sys.executable, os.path.abspath(sys.argv[0]), "--worker", path, "--threads",
                                   threads], stdout=subprocess.PIPE, check=True, text=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report(results)


def bridge_sampler(path: str):
    """bridge's side of a sampler comparison: the model at `path` loaded by `models.load_hf`;
    returns prompts -> (tokens, wall s, CPU s) of one greedy `sampling.generate` call, end to end
    (Python lists in, tokens on the host out)."""
    import numpy as np
    from bridge import models, sampling

    model = models.load_hf(path)
    return lambda prompts: timed(lambda: np.asarray(
        sampling.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0).tokens))


def compare_samplers(ours, theirs, peer: str, threads: str) -> list[dict]:
    """Rows of a sampler comparison. Per batch size in BATCHES: PROMPT_LEN random tokens per row
    (one seeded generator, so every sampler benchmark gets the same prompts), one warm-up call of
    each side (it compiles; its tokens give the share of greedy tokens both sides agree on), then
    SAMPLER_REPEATS alternating rounds. Each side maps prompts -> (tokens [batch, NEW_TOKENS],
    wall s, CPU s). A row holds each side's new tokens/s at its best wall time and, with one
    thread, the ratio of the best CPU times."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for batch in BATCHES:
        prompts = rng.integers(0, QWEN3_TOY["vocab_size"], (batch, PROMPT_LEN)).tolist()
        warm = [np.asarray(side(prompts)[0]) for side in (ours, theirs)]
        for tokens in warm:
            assert tokens.shape == (batch, NEW_TOKENS), tokens.shape
        agree = float(np.mean(warm[0] == warm[1]))
        runs = alternate(dict(ours=lambda: ours(prompts)[1:], peer=lambda: theirs(prompts)[1:]), SAMPLER_REPEATS)
        wall = {side: min(w for w, _ in times) for side, times in runs.items()}
        cpu = {side: min(c for _, c in times) for side, times in runs.items()}
        tokens = batch * NEW_TOKENS
        row = dict(batch=batch, ours=tokens / wall["ours"], peer=tokens / wall["peer"], agree=agree,
                   cpu_ratio=cpu["peer"] / cpu["ours"] if threads == "1" else None)
        rows.append(row)
        print(f"threads {threads}, batch {batch}: bridge {row['ours']:.0f} tok/s, {peer} {row['peer']:.0f} tok/s, "
              f"ratio {row['ours'] / row['peer']:.2f}x, same greedy tokens {agree:.1%}", file=sys.stderr, flush=True)
    return rows


def write_sampler_report(name: str, title: str, peer: str, setup: str, notes: list[str],
                         results: list[dict]) -> None:
    """Writes a sampler comparison: the model and the method shared by both sampler benchmarks,
    the peer's `setup` sentences, `notes` paragraphs, and one table of every thread setting's rows.
    `results`: one dict per thread setting with its `threads`, `rows` (`compare_samplers`), `load`
    (`load_note`) and `versions`."""
    cfg = model_config()
    table = [f"| threads | batch | bridge tok/s | {peer} tok/s | ratio | CPU-time ratio | same greedy tokens |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    loads = []
    for res in results:
        threads = f"{os.cpu_count()} (all)" if res["threads"] == "all" else res["threads"]
        for r in res["rows"]:
            cpu_ratio = "-" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}x"
            table.append(f"| {threads} | {r['batch']} | {r['ours']:.0f} | {r['peer']:.0f} | "
                         f"{r['ours'] / r['peer']:.2f}x | {cpu_ratio} | {r['agree']:.1%} |")
        loads.append(f"threads {threads}: {res['load']}")
    intro = (f"Qwen3-shaped random model: {describe_model(cfg)}, float32, written by transformers "
             "(`common.write_hf_model`) and loaded from the same safetensors by both sides. Greedy, "
             f"{PROMPT_LEN}-token random prompts (the same in every sampler benchmark), exactly {NEW_TOKENS} new "
             f"tokens per row, no eos stop. {setup} New tokens per second, end to end (Python lists of ids in, "
             f"tokens on the host out), best of {SAMPLER_REPEATS} alternating runs after one warm-up "
             f"(compilation) run per batch size; ratio = bridge / {peer}. With one thread every process is "
             "pinned to the same core with XLA's thread pool off, and the CPU-time ratio (process CPU seconds, "
             "best of the same runs) is the comparison least affected by other processes on a shared machine.")
    write_report(name, title, [intro, *notes], table, results[0]["versions"], "; ".join(loads))
