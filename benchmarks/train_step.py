"""GRPO train-step speed: bridge's jitted update vs Tunix's GRPO trainer step, same weights.

The random Qwen3 `common.QWEN3_TOY` (4 layers, hidden 256, MLP 768, 4 heads / 2 kv heads of 64,
vocab 32000, tied embeddings, float32) is initialized by bridge (seed 0) and saved as safetensors.
One batch of B = 8 rows (one prompt's group of 8) x S = 128 tokens: a 32-token prompt and a
96-token completion per row, random token ids in [1, V), no padding, group-normalized advantages
of fixed 0/1 rewards, old logprobs from one scoring pass of the initial weights (as `rl.build`
does), tis_weight = row_weight = 1.

bridge's step is `train_state.make_update_step(graphdef, rl.make_loss_fn(rl_stage(...)),
make_optimizer(...))`: GRPO clipped surrogate (0.2/0.2), token-mean, no KL, AdamW (b1 0.9, b2 0.99,
no weight decay) after global-norm clipping at 1.0, the non-finite guard, state donated. It runs
with each `token_logprobs` implementation ("auto" = the size dispatch of
`bridge/kernels/logprobs/api.py`, "reference" materializes the logits, "chunked" streams them;
forced by rebinding `scoring.token_logprobs`), plus a diagnostic variant that computes no entropy
(the entropy metric then reads 0), to show what the metric costs. Tunix (google-tunix 0.1.7, its
own venv at /work/tunix-venv): benchmarks/train_step_tunix.py, a `common.TunixPeer`, runs on the
same safetensors and batch and times one Tunix GRPO actor-trainer step per request (see that file
for what is and is not included). Each step is compiled and run twice (first-step loss and grad
norm, second-step loss: equal on both sides means both compute the same update); then every
bridge variant, the Tunix step and a jitted 2048^3 float32 matmul (the CPU's measured peak) take
turns (`common.alternate`), REPEATS rounds; median and min step times are reported.

Model FLOPs per step (the work the step needs; the same number for every row):
    6 * N_body * B*S  +  6 * N_head * B*N  +  12 * L * B*S * S * H*Dh
N_body = decoder parameters without the tied embedding, N_head = V*D (tied head; the embedding
lookup costs no FLOPs), B*S = 1024 positions through the decoder, B*N = 768 completion positions
through the head, the last term QK^T and PV forward and backward over the full S x S scores.
Achieved GFLOP/s = model FLOPs / median step time, against the matmul peak; XLA's own count
(`compiled.cost_analysis()`, elementwise work included) is listed beside it. Last, the
token_logprobs kernel alone (forward + backward with entropy), reference vs chunked, at this
size and larger token counts, shows where the size dispatch should switch.

    .venv/bin/python benchmarks/train_step.py [--no-tunix]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile

import common

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bridge import advantages as adv_lib, scoring, train_state  # noqa: E402
from bridge.kernels.logprobs import api as logprobs_api  # noqa: E402
from bridge.models import Decoder, save_hf  # noqa: E402
from bridge.stages import rl  # noqa: E402
from configs.common import rl_stage, sampling  # noqa: E402

ROWS, PROMPT_LEN, COMPLETION_LEN = 8, 32, 96
SEQ = PROMPT_LEN + COMPLETION_LEN
REWARDS = (1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0)  # one group of 8
LR = 1e-5
REPEATS = 15
PIECE_REPEATS = 5  # kernel sweep
PEAK_SIZE = 2048
SWEEP_TOKENS = (768, 1536, 3072)
IMPLEMENTATIONS = ("auto", "reference", "chunked")
NO_ENTROPY = "chunked, entropy metric not computed (diagnostic)"
MODEL = common.model_config()


def stage_config():
    """The GRPO stage config of the step: one prompt's group of ROWS, lr LR, the rl_stage defaults."""
    return rl_stage("policy", lr=LR, steps=1, prompts_per_step=1,
                    sampling=sampling(ROWS, max_new_tokens=COMPLETION_LEN))


def model_flops(cfg) -> dict:
    """The formula in the module docstring, term by term."""
    head = cfg.vocab_size * cfg.hidden_size
    body = cfg.num_params() - head
    positions, completions = ROWS * SEQ, ROWS * COMPLETION_LEN
    terms = dict(body=6 * body * positions, head=6 * head * completions,
                 attention=12 * cfg.num_layers * positions * SEQ * cfg.num_heads * cfg.head_dim)
    return dict(terms, total=sum(terms.values()), params=cfg.num_params(), body_params=body,
                head_params=head, naive_6nt=6 * cfg.num_params() * positions + terms["attention"])


def make_batch(graphdef, params) -> dict:
    """The fixed batch (module docstring), as numpy arrays; old_logp scored by the initial weights."""
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
def logprobs_routing(name: str, entropy: bool = True):
    """Routes scoring's token_logprobs through `implementation=name` ("auto": the dispatch); with
    entropy=False it never computes the entropy (returns zeros for it)."""
    original = scoring.token_logprobs
    impl = None if name == "auto" else name

    def routed(hidden, head, targets, temperature=1.0, *, return_entropy=False, **kw):
        if entropy:
            return original(hidden, head, targets, temperature, return_entropy=return_entropy,
                            implementation=impl, **kw)
        logp = original(hidden, head, targets, temperature, implementation=impl, **kw)
        return (logp, jnp.zeros_like(logp)) if return_entropy else logp

    scoring.token_logprobs = routed
    try:
        yield
    finally:
        scoring.token_logprobs = original


def timed_rounds(graphdef, params, batch, tunix: common.TunixPeer | None) -> dict:
    """Every bridge variant, Tunix's step and the PEAK_SIZE^3 matmul, alternately, REPEATS rounds.

    Returns per bridge variant the median/min step time, XLA's FLOP count, first-step loss and
    grad norm and second-step loss; the Tunix step times; the matmul peak."""
    scfg = stage_config()
    tx = train_state.make_optimizer(scfg.optimizer)
    loss_fn = rl.make_loss_fn(scfg)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    variants = {name: functools.partial(logprobs_routing, name) for name in IMPLEMENTATIONS}
    variants[NO_ENTROPY] = functools.partial(logprobs_routing, "chunked", entropy=False)
    runs = {}
    for name, routing in variants.items():
        with routing():  # the step is traced inside, at its first call
            update = train_state.make_update_step(graphdef, loss_fn, tx)
            state = train_state.init_state(jax.tree.map(jnp.copy, params), tx)
            xla_flops = update.lower(state, device_batch, None).compile().cost_analysis().get("flops", float("nan"))
            (state, first), _, _ = common.timed(update, state, device_batch, None)
            (state, second), _, _ = common.timed(update, state, device_batch, None)
        runs[name] = dict(update=update, state=state, xla_flops=float(xla_flops), loss=float(first["loss"]),
                          grad_norm=float(first["grad_norm"]), second_loss=float(second["loss"]))

    def bridge_step(run) -> float:
        (run["state"], _), seconds, _ = common.timed(run["update"], run["state"], device_batch, None)
        return seconds

    def tunix_step() -> float | None:
        with contextlib.suppress(RuntimeError):  # a failed peer: its error is reported instead
            return tunix.request(step=True)["seconds"]
        return None

    a, b = (jax.random.normal(jax.random.key(i), (PEAK_SIZE, PEAK_SIZE), jnp.float32) for i in (1, 2))
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    common.timed(dot, a, b)
    sides = {name: functools.partial(bridge_step, run) for name, run in runs.items()}
    sides["peak"] = lambda: common.timed(dot, a, b)[1]
    if tunix is not None:
        with contextlib.suppress(RuntimeError):  # a failed peer: its error is reported instead
            ready = tunix.ready()
            sides["tunix"] = tunix_step
    times = common.alternate(sides, REPEATS)
    out = dict(bridge={name: dict(median_s=float(np.median(times[name])), min_s=float(np.min(times[name])),
                                  **{k: r[k] for k in ("xla_flops", "loss", "grad_norm", "second_loss")})
                       for name, r in runs.items()})
    peak_s = float(np.median(times["peak"]))
    out["peak"] = dict(seconds=peak_s, gflops=2 * PEAK_SIZE**3 / peak_s / 1e9)
    if tunix is not None:
        out["tunix"] = {"error": tunix.error} if tunix.error else dict(
            ready, median_s=float(np.median(times["tunix"])), min_s=float(np.min(times["tunix"])))
    return out


def kernel_sweep() -> list[dict]:
    """token_logprobs (with entropy) forward + backward alone, reference vs chunked, by token count."""
    d, v = MODEL.hidden_size, MODEL.vocab_size
    head = 0.02 * jax.random.normal(jax.random.key(4), (d, v), jnp.float32)
    rows = []
    for n in SWEEP_TOKENS:
        hidden = jax.random.normal(jax.random.key(5), (n, d), jnp.float32)
        targets = jax.random.randint(jax.random.key(6), (n,), 0, v)
        g = jax.random.normal(jax.random.key(7), (n,), jnp.float32)
        row = dict(tokens=n, logits_mib=n * v * 4 / 2**20, dispatch=logprobs_api._choose_implementation(None, n, v))
        for impl in ("reference", "chunked"):
            def loss(h, w, impl=impl):
                logp, ent = logprobs_api.token_logprobs(h, w, targets, return_entropy=True, implementation=impl)
                return jnp.sum(logp * g) + 0.0 * jnp.sum(ent)
            row[impl] = float(np.median(common.wall_times(jax.jit(jax.grad(loss, argnums=(0, 1))), hidden, head,
                                                          repeats=3 if n > 2000 else PIECE_REPEATS)))
        rows.append(row)
    return rows


def report(res: dict) -> None:
    """Writes results/train_step.md: the model, FLOPs and matmul peak, the step table, Tunix, the sweep."""
    flops, peak, tunix = res["flops"], res["peak"], res["tunix"]
    tokens, completions = ROWS * SEQ, ROWS * COMPLETION_LEN
    auto = res["bridge"]["auto"]["median_s"]

    def row(label, r):
        gflops = flops["total"] / r["median_s"] / 1e9
        return (f"| {label} | {r['median_s'] * 1e3:.0f} | {r['min_s'] * 1e3:.0f} | {tokens / r['median_s']:.0f} | "
                f"{completions / r['median_s']:.0f} | {gflops:.1f} | {gflops / peak['gflops']:.1%} | "
                f"{r['xla_flops'] / 1e9:.1f} | {r['grad_norm']:.6f} | {r['second_loss']:.7f} | "
                f"{r['median_s'] / auto:.2f}x |")

    dispatched = logprobs_api._choose_implementation(None, completions, MODEL.vocab_size)
    steps = [f"| step | median ms | min ms | tokens/s ({tokens}) | completion tokens/s ({completions}) | "
             "GFLOP/s (model FLOPs) | of matmul peak | XLA GFLOP | first-step grad norm | second-step loss | "
             "time / bridge auto |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    steps += [row(f"bridge, token_logprobs {name}" + (f" (dispatches to {dispatched})" if name == "auto" else ""), r)
              for name, r in res["bridge"].items()]
    if "error" in tunix:
        tunix_note = f"Tunix could not be measured: {tunix['error']}."
    else:
        steps.append(row(f"Tunix {tunix['version']} GRPO actor-trainer step", tunix))
        tunix_note = (f"Tunix ({tunix['versions']}; its own venv and process, driven step by step): {tunix['what']} "
                      f"bridge (auto) / Tunix: **{tunix['median_s'] / auto:.2f}x** (median step times); equal "
                      "first-step grad norms and second-step losses mean both compute the same update.")
    sweep = [f"| {r['tokens']} | {r['logits_mib']:.0f} | {r['dispatch']} | {r['reference'] * 1e3:.0f} | "
             f"{r['chunked'] * 1e3:.0f} | {r['chunked'] / r['reference']:.2f} |" for r in res["sweep"]]
    common.write_report("train_step", "GRPO train step: bridge vs Tunix (CPU, float32)", [
        f"Qwen3-shaped random model: {common.describe_model(MODEL)}, {flops['params'] / 1e6:.2f}M parameters, "
        f"float32, the same safetensors for both sides. Batch [{ROWS}, {SEQ}]: one group of {ROWS} rows x "
        f"({PROMPT_LEN}-token prompt + {COMPLETION_LEN}-token completion), no padding. One update per step: GRPO "
        "clipped surrogate (0.2/0.2), token-mean, no KL, AdamW (b1 0.9, b2 0.99, wd 0) after global-norm clip 1.0. "
        f"Median and min of {REPEATS} steps after compile and a warm-up step; every row and the matmul peak take "
        "turns, one of each per round, so ratios between rows are the reliable figures on a shared machine. "
        "Method: the docstring of `benchmarks/train_step.py`.",
        f"Model FLOPs per step: body 6 * {flops['body_params']:,} * {tokens} = {flops['body'] / 1e9:.2f}, head "
        f"6 * {flops['head_params']:,} * {completions} = {flops['head'] / 1e9:.2f}, attention 12 * "
        f"{MODEL.num_layers} * {tokens} * {SEQ} * {MODEL.num_heads * MODEL.head_dim} = "
        f"{flops['attention'] / 1e9:.2f}: **{flops['total'] / 1e9:.2f} GFLOP** ({flops['naive_6nt'] / 1e9:.2f} "
        "with the head on every position, as Tunix computes it). CPU float32 matmul peak (jitted jnp.dot "
        f"{PEAK_SIZE}^3 in the same rounds, median): {peak['seconds'] * 1e3:.0f} ms = **{peak['gflops']:.1f} "
        "GFLOP/s**."],
        [*steps, "", "XLA GFLOP: `compiled.cost_analysis()['flops']` of the whole step (elementwise work included). "
         "The diagnostic row computes no entropy (the `entropy` metric reads 0): what the metric costs.", "",
         tunix_note, "",
         f"token_logprobs alone (forward + backward, with entropy), D = {MODEL.hidden_size}, V = {MODEL.vocab_size}; "
         f"the dispatch picks reference up to `REFERENCE_MAX_LOGITS_BYTES` = "
         f"{logprobs_api.REFERENCE_MAX_LOGITS_BYTES / 2**20:.0f} MiB of float32 logits, chunked (default chunk "
         f"size) above; median of {PIECE_REPEATS} (3 above 2000 tokens):", "",
         "| tokens | logits MiB | dispatch picks | reference ms | chunked ms | chunked / reference |",
         "|---:|---:|---|---:|---:|---:|", *sweep],
        common.jax_versions() + " (XLA's default CPU thread pool, every core)", res["load"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-tunix", action="store_true", help="skip the Tunix subprocess")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    model = Decoder(MODEL, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    error = "skipped (--no-tunix)" if args.no_tunix else common.tunix_venv_missing()
    tunix = None
    with tempfile.TemporaryDirectory() as path:
        save_hf(model, path)
        batch = make_batch(graphdef, params)
        batch_path = os.path.join(path, "batch.npz")
        np.savez(batch_path, **batch)
        if error is None:  # it loads and compiles while bridge does
            tunix = common.TunixPeer("train_step_tunix.py", "--serve", "--model", path, "--batch", batch_path,
                                     "--lr", str(LR))
        try:
            res = {"flops": model_flops(MODEL), "tunix": {"error": error},
                   **timed_rounds(graphdef, params, batch, tunix)}
        finally:
            if tunix is not None:
                tunix.close()
    res["sweep"] = kernel_sweep()
    res["load"] = common.load_note(load_before)
    report(res)


if __name__ == "__main__":
    main()
