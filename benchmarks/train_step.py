"""GRPO train-step speed: bridge's jitted update vs Tunix's GRPO trainer step, same weights.

A random Qwen3-shaped model (4 layers, hidden 256, MLP 768, 4 heads / 2 kv heads of 64,
vocab 32000, tied embeddings, float32) is initialized by bridge (seed 0) and saved as
safetensors. One batch of B = 8 rows (one prompt's group of 8) x S = 128 tokens: a 32-token
prompt and a 96-token completion per row, random token ids in [1, V), no padding (every mask
true), group-normalized advantages of fixed 0/1 rewards, old logprobs from one scoring pass
of the initial weights (as `rl.build` does), tis_weight = row_weight = 1.

bridge's step is `train_state.make_update_step(graphdef, rl.make_loss_fn(common.rl_stage(...)),
make_optimizer(...))`: GRPO clipped surrogate (0.2/0.2), token-mean, no KL, AdamW (b1 0.9,
b2 0.99, no weight decay) after global-norm clipping at 1.0, the non-finite guard, state
donated. It runs with each `token_logprobs` implementation ("auto" = the size dispatch of
`bridge/kernels/logprobs/api.py`, "reference", "chunked"; forced by rebinding `scoring.token_logprobs`
to a partial with `implementation=`). Each compiled step is warmed up (compiled) and then the
variants are timed alternately, REPEATS steps each (the state carries over, the batch is
fixed), wall time until the new state and metrics are ready; the median is reported. The
Tunix step and the matmul-peak benchmark are timed in the same rounds.

Model FLOPs per step (the work the step needs; the same number for every implementation):
    6 * N_body * B*S  +  6 * N_head * B*N  +  12 * L * B*S * S * H*Dh
N_body = decoder parameters without the tied embedding (matmul weights + norms), N_head = V*D
(tied head; the embedding lookup costs no FLOPs), B*S = 1024 positions through the decoder,
B*N = 768 completion positions through the head, the last term QK^T and PV forward and
backward over the full S x S scores (the reference attention computes the masked half too).
Achieved GFLOP/s = model FLOPs / median step time, against the CPU's measured float32 matmul
peak (median of jitted 2048^3 jnp.dot, timed in the same rounds). XLA's own count (`compiled.cost_analysis()`) of each
compiled step is listed beside it (elementwise work included).

A diagnostic variant routes token_logprobs so that no entropy is computed (the entropy metric
then reads 0), to show what the metric costs. Where the time goes: a `jax.profiler` trace of
the fastest variant, XLA op times summed by kind (LM head matmuls, softmax/entropy work on
the logits, decoder matmuls, decoder elementwise, optimizer + guard, XLA-inserted copies).
The token_logprobs kernel alone (forward + backward with entropy), reference vs chunked, at
this size and larger token counts, shows where the size dispatch should switch.

Tunix (google-tunix 0.1.7, its own venv at /work/tunix-venv): when that venv exists,
benchmarks/train_step_tunix.py runs in it on the same safetensors and batch and times Tunix's
GRPO actor-trainer step (see that file for what is and is not included).

    .venv/bin/python benchmarks/train_step.py
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "train_step.md")
TUNIX_PYTHON = "/work/tunix-venv/bin/python"
TUNIX_SCRIPT = os.path.join(ROOT, "benchmarks", "train_step_tunix.py")
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bridge import advantages as adv_lib, scoring, train_state  # noqa: E402
from bridge.models import Decoder, ModelConfig, save_hf  # noqa: E402
from bridge.stages import rl  # noqa: E402
from sampler_vs_hf import cpu_name, write_report  # noqa: E402
from configs import common  # noqa: E402
from bridge.kernels.logprobs import api as logprobs_api  # noqa: E402

ROWS, PROMPT_LEN, COMPLETION_LEN = 8, 32, 96
REWARDS = (1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0)  # one group of 8
LR = 1e-5
REPEATS = 15
PIECE_REPEATS = 5  # kernel sweep
PROFILE_STEPS = 3
PEAK_SIZE = 2048
SWEEP_TOKENS = (768, 1536, 3072)
IMPLEMENTATIONS = ("auto", "reference", "chunked")
NO_ENTROPY = "chunked, entropy metric not computed (diagnostic)"
MODEL = ModelConfig(family="qwen3", vocab_size=32000, hidden_size=256, intermediate_size=768,
                    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                    rope_theta=1_000_000.0, max_position_embeddings=4096, tie_word_embeddings=True,
                    qk_norm=True)


def stage_config():
    return common.rl_stage("policy", lr=LR, steps=1, group_size=ROWS, prompts_per_step=1,
                           max_new_tokens=COMPLETION_LEN)


def model_flops(cfg: ModelConfig) -> dict:
    """The formula in the module docstring, term by term."""
    head = cfg.vocab_size * cfg.hidden_size
    body = cfg.num_params() - head
    seq, positions, completions = PROMPT_LEN + COMPLETION_LEN, ROWS * (PROMPT_LEN + COMPLETION_LEN), \
        ROWS * COMPLETION_LEN
    terms = dict(body=6 * body * positions, head=6 * head * completions,
                 attention=12 * cfg.num_layers * positions * seq * cfg.num_heads * cfg.head_dim)
    return dict(terms, total=sum(terms.values()), params=cfg.num_params(), body_params=body,
                head_params=head, naive_6nt=6 * cfg.num_params() * positions + terms["attention"])


def make_batch(graphdef, params) -> dict:
    rng = np.random.default_rng(0)
    vocab = MODEL.vocab_size
    batch = {
        "prompt_tokens": rng.integers(1, vocab, (ROWS, PROMPT_LEN), dtype=np.int32),
        "prompt_mask": np.ones((ROWS, PROMPT_LEN), bool),
        "tokens": rng.integers(1, vocab, (ROWS, COMPLETION_LEN), dtype=np.int32),
        "mask": np.ones((ROWS, COMPLETION_LEN), bool),
        "advantages": np.asarray(adv_lib.advantage_estimator("grpo")(jnp.asarray(REWARDS), ROWS), np.float32),
        "row_weight": np.ones((ROWS,), np.float32),
        "tis_weight": np.ones((ROWS, COMPLETION_LEN), np.float32),
    }
    score = jax.jit(lambda p, b: scoring.completion_logprobs(nnx.merge(graphdef, p), b))
    batch["old_logp"] = np.asarray(score(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    return batch


@contextlib.contextmanager
def logprobs_implementation(name: str):
    """Routes scoring's token_logprobs through `implementation=name` ("auto": untouched)."""
    original = scoring.token_logprobs
    if name != "auto":
        scoring.token_logprobs = functools.partial(original, implementation=name)
    try:
        yield
    finally:
        scoring.token_logprobs = original


@contextlib.contextmanager
def logprobs_without_entropy(name: str):
    """As `logprobs_implementation`, but never computes the entropy (returns zeros for it):
    measures what the entropy metric costs inside the step."""
    original = scoring.token_logprobs
    impl = None if name == "auto" else name

    def logp_only(hidden, head, targets, temperature=1.0, *, return_entropy=False, **kw):
        logp = original(hidden, head, targets, temperature, implementation=impl, **kw)
        return (logp, jnp.zeros_like(logp)) if return_entropy else logp

    scoring.token_logprobs = logp_only
    try:
        yield
    finally:
        scoring.token_logprobs = original


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_time(fn, *args, repeats: int) -> float:
    fn(*args)  # compile
    return float(np.median([timed(fn, *args) for _ in range(repeats)]))


def timed_rounds(graphdef, params, batch, tunix: TunixPeer | None) -> dict:
    """Every bridge variant, Tunix's step and the 2048^3 matmul, alternately, REPEATS rounds.

    Returns per bridge variant the median/min step time, XLA's FLOP count, first-step loss and
    grad norm and second-step loss; the Tunix step times; the matmul peak."""
    scfg = stage_config()
    tx = train_state.make_optimizer(scfg.optimizer)
    loss_fn = rl.make_loss_fn(scfg)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    variants = {name: functools.partial(logprobs_implementation, name) for name in IMPLEMENTATIONS}
    variants[NO_ENTROPY] = functools.partial(logprobs_without_entropy, "chunked")
    runs = {}
    for name, routing in variants.items():
        with routing():  # the step is traced inside, at its first call
            update = train_state.make_update_step(graphdef, loss_fn, tx)
            state = train_state.init_state(jax.tree.map(jnp.copy, params), tx)
            xla_flops = update.lower(state, device_batch, None).compile().cost_analysis().get("flops", float("nan"))
            state, first = jax.block_until_ready(update(state, device_batch, None))
            state, second = jax.block_until_ready(update(state, device_batch, None))
        runs[name] = dict(update=update, state=state, times=[], xla_flops=float(xla_flops),
                          loss=float(first["loss"]), grad_norm=float(first["grad_norm"]),
                          second_loss=float(second["loss"]))
    n = PEAK_SIZE
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in (1, 2))
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    jax.block_until_ready(dot(a, b))
    if tunix is not None:
        tunix.wait_ready()
    dot_times, tunix_times = [], []
    for _ in range(REPEATS):  # alternate, so load from other work spreads over everything timed
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["update"](run["state"], device_batch, None)
            jax.block_until_ready((run["state"], metrics))
            run["times"].append(time.perf_counter() - start)
        if tunix is not None and (seconds := tunix.step()) is not None:
            tunix_times.append(seconds)
        dot_times.append(timed(dot, a, b))
    bridge = {name: dict(median_s=float(np.median(r["times"])), min_s=float(np.min(r["times"])),
                         **{k: r[k] for k in ("xla_flops", "loss", "grad_norm", "second_loss")})
              for name, r in runs.items()}
    peak_s = float(np.median(dot_times))
    return dict(bridge=bridge, tunix_times=tunix_times,
                peak=dict(size=n, seconds=peak_s, gflops=2 * n**3 / peak_s / 1e9))


PROFILE_CATEGORIES = (
    "LM head matmuls (logits, d hidden, d head)",
    "log-softmax / entropy and their gradient on the [768, 32000] logits",
    "decoder matmuls (projections, MLP, attention einsums)",
    "decoder elementwise, norms, attention softmax, embedding gather/scatter",
    "optimizer update, non-finite guard, grad norm, metrics",
    "buffer copies without source (XLA-inserted)",
)


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Top-level HLO instruction name -> (output shape, op_name metadata)."""
    ops = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([^\n]*)$", hlo_text, re.M):
        op_name = re.search(r'op_name="([^"]*)"', m.group(3))
        ops[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
    return ops


def categorize(name: str, shape: str, op_name: str) -> str:
    is_dot = name.startswith("dot") or op_name.endswith("dot_general")
    logits_shaped = re.search(rf"\[({ROWS * COMPLETION_LEN}|{ROWS},{COMPLETION_LEN}),{MODEL.vocab_size}\]", shape)
    if is_dot and (logits_shaped or f"{MODEL.vocab_size}," in shape or "dv->" in op_name or "->dv" in op_name):
        return PROFILE_CATEGORIES[0]
    if logits_shaped:
        return PROFILE_CATEGORIES[1]
    if not op_name:
        return PROFILE_CATEGORIES[5]
    if "jvp(" not in op_name and "transpose(" not in op_name:
        return PROFILE_CATEGORIES[4]
    return PROFILE_CATEGORIES[2] if is_dot else PROFILE_CATEGORIES[3]


def profile_step(graphdef, params, batch, implementation: str) -> dict:
    """jax.profiler trace of PROFILE_STEPS steps: XLA op time per step by category, top ops.

    Op times are thread times: XLA's CPU runtime runs independent ops on its threads at
    once, so they add up to more than the wall time of a step.
    """
    scfg = stage_config()
    tx = train_state.make_optimizer(scfg.optimizer)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    with logprobs_implementation(implementation):
        update = train_state.make_update_step(graphdef, rl.make_loss_fn(scfg), tx)
        state = train_state.init_state(jax.tree.map(jnp.copy, params), tx)
        ops = hlo_ops(update.lower(state, b, None).compile().as_text())
        for _ in range(2):
            state, _ = jax.block_until_ready(update(state, b, None))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(PROFILE_STEPS):
            state, _ = jax.block_until_ready(update(state, b, None))
        wall = (time.perf_counter() - start) / PROFILE_STEPS
        jax.profiler.stop_trace()
        (trace_file,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(trace_file) as f:
            events = json.load(f)["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
        if op in ops:
            per_op[op] += e["dur"] / 1e6 / PROFILE_STEPS
    by_category = collections.Counter()
    for op, seconds in per_op.items():
        by_category[categorize(op, *ops[op])] += seconds
    top = [dict(op=op, ms=s * 1e3, shape=ops[op][0], op_name=ops[op][1] or "(none)",
                category=categorize(op, *ops[op])) for op, s in per_op.most_common(8)]
    return dict(implementation=implementation, wall_s=wall, op_total_s=sum(per_op.values()),
                categories={c: by_category[c] for c in PROFILE_CATEGORIES}, top=top)


def kernel_sweep() -> list[dict]:
    """token_logprobs (with entropy) forward + backward alone, reference vs chunked, by token count."""
    d, v = MODEL.hidden_size, MODEL.vocab_size
    head = 0.02 * jax.random.normal(jax.random.key(4), (d, v), jnp.float32)
    rows = []
    for n in SWEEP_TOKENS:
        hidden = jax.random.normal(jax.random.key(5), (n, d), jnp.float32)
        targets = jax.random.randint(jax.random.key(6), (n,), 0, v)
        g = jax.random.normal(jax.random.key(7), (n,), jnp.float32)
        row = dict(tokens=n, logits_mib=n * v * 4 / 2**20,
                   dispatch=logprobs_api._choose_implementation(None, n, v))
        for impl in ("reference", "chunked"):
            def loss(h, w, impl=impl):
                logp, ent = logprobs_api.token_logprobs(h, w, targets, return_entropy=True, implementation=impl)
                return jnp.sum(logp * g) + 0.0 * jnp.sum(ent)
            row[impl] = median_time(jax.jit(jax.grad(loss, argnums=(0, 1))), hidden, head,
                                    repeats=3 if n > 2000 else PIECE_REPEATS)
        rows.append(row)
    return rows


class TunixPeer:
    """benchmarks/train_step_tunix.py --serve in the Tunix venv: compiles while bridge does, then
    times one of its steps per `step()` call, so the two sides alternate under the same load."""

    def __init__(self, model_dir: str, batch_path: str):
        self.error = None
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([TUNIX_PYTHON, TUNIX_SCRIPT, "--serve", "--model", model_dir, "--batch",
                                      batch_path, "--lr", str(LR)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def _fail(self, what: str) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.seek(0)
        tail = [x for x in self.log.read().strip().splitlines() if x.strip()][-3:]
        self.error = f"{what}; exit {self.proc.returncode}; stderr ends: {' / '.join(tail)}"

    def wait_ready(self) -> None:
        if self.proc.stdout.readline().strip() != json.dumps({"ready": True}):
            self._fail("train_step_tunix.py did not get ready")

    def step(self) -> float | None:
        if self.error:
            return None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._fail("train_step_tunix.py stopped")
            return None
        return float(line)

    def finish(self, times: list[float]) -> dict:
        if self.error:
            return {"error": self.error}
        out, _ = self.proc.communicate("")
        res = json.loads(out.strip().splitlines()[-1])
        return dict(res, median_s=float(np.median(times)), min_s=float(np.min(times)))


def report(res: dict) -> str:
    flops, peak = res["flops"], res["peak"]
    tokens, completions = ROWS * (PROMPT_LEN + COMPLETION_LEN), ROWS * COMPLETION_LEN
    auto = res["bridge"]["auto"]["median_s"]

    def row(label, r):
        gflops = flops["total"] / r["median_s"] / 1e9
        return (f"| {label} | {r['median_s'] * 1e3:.0f} | {r['min_s'] * 1e3:.0f} | {tokens / r['median_s']:.0f} | "
                f"{completions / r['median_s']:.0f} | {gflops:.1f} | {gflops / peak['gflops']:.1%} | "
                f"{r['xla_flops'] / 1e9:.1f} | {r['grad_norm']:.6f} | {r['second_loss']:.7f} | "
                f"{r['median_s'] / auto:.2f}x |")

    dispatched = logprobs_api._choose_implementation(None, completions, MODEL.vocab_size)
    table = ["| step | median ms | min ms | tokens/s (1024 per step) | completion tokens/s (768) | "
             "achieved GFLOP/s (model FLOPs) | of matmul peak | XLA-counted GFLOP | first-step grad norm | "
             "second-step loss | time / bridge auto |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["bridge"].items():
        table.append(row(f"bridge, token_logprobs {name}" + (f" (dispatches to {dispatched})" if name == "auto"
                                                            else ""), r))
    tunix = res["tunix"]
    if "error" in tunix:
        tunix_lines = [f"Tunix could not be measured: {tunix['error']}."]
    else:
        table.append(row(f"Tunix {tunix['version']} GRPO actor-trainer step", tunix))
        tunix_lines = [f"Tunix ({tunix['versions']}; separate venv and process, steps alternated with bridge's): "
                       f"{tunix['what']}", "",
                       f"bridge (auto) / Tunix speed: **{tunix['median_s'] / auto:.2f}x** (median step times). "
                       "Equal first-step grad norms and second-step losses (after one AdamW update) on both sides "
                       "check that the two steps compute the same thing on the same weights and batch."]
    prof = res["profile"]
    categories = [f"| {c} | {s * 1e3:.0f} | {s / prof['op_total_s']:.0%} |" for c, s in prof["categories"].items()]
    top = [f"| {t['op']} | {t['ms']:.0f} | `{t['shape']}` | `{t['op_name']}` | {t['category']} |" for t in prof["top"]]
    sweep = [f"| {r['tokens']} | {r['logits_mib']:.0f} | {r['dispatch']} | {r['reference'] * 1e3:.0f} | "
             f"{r['chunked'] * 1e3:.0f} | {r['chunked'] / r['reference']:.2f} |" for r in res["sweep"]]
    machine = (f"{cpu_name()}, {os.cpu_count()} cores (XLA's default CPU thread pool, every core); "
               f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
               f"jax {jax.__version__}")
    return "\n".join([
        "# GRPO train step: bridge vs Tunix (CPU, float32)", "",
        f"Qwen3-shaped random model: {MODEL.num_layers} layers, hidden {MODEL.hidden_size}, MLP "
        f"{MODEL.intermediate_size}, {MODEL.num_heads} heads / {MODEL.num_kv_heads} kv heads x {MODEL.head_dim}, "
        f"vocab {MODEL.vocab_size}, tied embeddings, {flops['params'] / 1e6:.2f}M parameters, float32, "
        "the same safetensors loaded by both. "
        f"Batch [{ROWS}, {PROMPT_LEN + COMPLETION_LEN}]: {ROWS} rows (one group of {ROWS}) x ({PROMPT_LEN}-token "
        f"prompt + {COMPLETION_LEN}-token completion), no padding. One optimizer update per step: GRPO clipped "
        "surrogate (0.2/0.2), token-mean, no KL, AdamW (b1 0.9, b2 0.99, wd 0) after global-norm clip 1.0. "
        f"Median (and min) of {REPEATS} steps after compile and one warm-up step. Every bridge variant, the "
        "Tunix step (its own process, driven step by step) and the matmul peak are timed alternately, one of "
        "each per round, so they share the machine's load.", "",
        f"Machine: {machine}. The machine is shared: 1-minute load average {res['load'][0]:.1f} before, "
        f"{res['load'][1]:.1f} after (on {os.cpu_count()} cores), so absolute times are inflated and noisy; "
        "ratios between rows timed alternately are the more reliable figures.", "",
        "Command: `.venv/bin/python benchmarks/train_step.py`", "",
        f"Model FLOPs per step = 6 * N_body * B*S + 6 * N_head * B*N + 12 * L * B*S * S * H*Dh = "
        f"6 * {flops['body_params']:,} * {tokens} + 6 * {flops['head_params']:,} * {completions} + "
        f"12 * {MODEL.num_layers} * {tokens} * {PROMPT_LEN + COMPLETION_LEN} * {MODEL.num_heads * MODEL.head_dim} = "
        f"{flops['body'] / 1e9:.2f} + {flops['head'] / 1e9:.2f} + {flops['attention'] / 1e9:.2f} = "
        f"**{flops['total'] / 1e9:.2f} GFLOP** (N_body: decoder weights without the tied embedding; N_head = V*D; "
        "B*S positions through the decoder, B*N completion positions through the head; attention forward + "
        "backward over the full S x S). The plain 6 * N * B*S + attention (head on every position, as Tunix "
        f"computes it) would be {flops['naive_6nt'] / 1e9:.2f}. The same model-FLOP count divides every row.", "",
        f"CPU float32 matmul peak, measured in this run, alternately with the steps: jitted jnp.dot "
        f"{peak['size']}^3, median of {REPEATS}: {peak['seconds'] * 1e3:.0f} ms = **{peak['gflops']:.1f} GFLOP/s**.",
        "",
        *table, "",
        "XLA-counted GFLOP: `compiled.cost_analysis()['flops']` of the whole step (elementwise work included). "
        "The diagnostic row computes no entropy (the step's `entropy` metric reads 0); it measures what the "
        "metric costs.", "",
        *tunix_lines, "",
        f"## Where the time goes (bridge, token_logprobs {prof['implementation']})", "",
        f"`jax.profiler` trace of {PROFILE_STEPS} steps (wall {prof['wall_s'] * 1e3:.0f} ms per step while "
        "tracing); each XLA op's time from the trace, summed per step by kind (the op's output shape and its "
        "`op_name` metadata). XLA's CPU runtime runs independent ops on several threads at once, so the op "
        f"times add up to {prof['op_total_s'] * 1e3:.0f} ms per step, more than the wall time.", "",
        "| kind | op ms per step | share |", "|---|---:|---:|", *categories, "",
        "Largest ops:", "",
        "| op | ms per step | output | op_name | kind |", "|---|---:|---|---|---|", *top, "",
        f"## token_logprobs alone (forward + backward, with entropy), D = {MODEL.hidden_size}, "
        f"V = {MODEL.vocab_size}", "",
        f"`REFERENCE_MAX_LOGITS_BYTES` = {logprobs_api.REFERENCE_MAX_LOGITS_BYTES / 2**20:.0f} MiB of float32 "
        "logits: the dispatch picks reference at or below it, chunked above (chunked at its default chunk size). "
        f"Median of {PIECE_REPEATS} (3 above 2000 tokens).", "",
        "| tokens | logits MiB | dispatch picks | reference ms | chunked ms | chunked / reference |",
        "|---:|---:|---|---:|---:|---:|", *sweep, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-tunix", action="store_true", help="skip the Tunix subprocess")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    model = Decoder(MODEL, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    with tempfile.TemporaryDirectory() as path:
        save_hf(model, path)
        batch = make_batch(graphdef, params)
        batch_path = os.path.join(path, "batch.npz")
        np.savez(batch_path, **batch)
        tunix = None if args.no_tunix or not os.path.exists(TUNIX_PYTHON) else TunixPeer(path, batch_path)
        res = dict(flops=model_flops(MODEL), **timed_rounds(graphdef, params, batch, tunix))
        if tunix is not None:
            res["tunix"] = tunix.finish(res["tunix_times"])
        else:
            res["tunix"] = {"error": "skipped (--no-tunix)" if args.no_tunix else
                            f"{TUNIX_PYTHON} does not exist (create it: python3 -m venv /work/tunix-venv && "
                            "/work/tunix-venv/bin/pip install google-tunix==0.1.7)"}
        print(json.dumps({k: res[k] for k in ("bridge", "tunix", "peak")}, indent=1), file=sys.stderr, flush=True)
        fastest = min(IMPLEMENTATIONS, key=lambda k: res["bridge"][k]["median_s"])
        res["profile"] = profile_step(graphdef, params, batch, fastest)
        res["sweep"] = kernel_sweep()
    res["load"] = (load_before, os.getloadavg()[0])
    write_report(report(res), RESULTS)


if __name__ == "__main__":
    main()
