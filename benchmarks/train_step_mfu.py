"""Model FLOPs utilization of the GRPO train step at a real model shape, on the device it runs on.

A random Qwen3 of the chosen shape (`qwen3-1.7b`: common.QWEN3_1_7B, 28 layers, hidden 2048,
vocab 151,936, tied; `toy`: common.QWEN3_TOY) with float32 master parameters and bfloat16
compute (`--dtype`), scanned layers with remat, takes the GRPO update step the rl stage builds
(`train_state.make_update_step` with `rl.make_loss_fn`: clipped surrogate, token-mean, AdamW,
state donated) on B rows x (P prompt + C completion) random tokens with group advantages.
Model FLOPs per step, as in benchmarks/train_step.py:

    6 * N_body * B*S  +  6 * N_head * B*C  +  12 * L * B*S * S * H*Dh        (S = P + C)

MFU = model FLOPs / step time / peak, where the peak is the best of repeated jitted N^3 matmuls
in the compute dtype on this device (measured, not a datasheet figure; the datasheet's dense
bf16 number is printed beside it when known). Remat recomputes the forward pass, which the
formula does not count: MFU, not hardware utilization.

    .venv/bin/python benchmarks/train_step_mfu.py                           # qwen3-1.7b, bf16, B 8 x 1024
    .venv/bin/python benchmarks/train_step_mfu.py --shape=toy --rows=4 --prompt_len=16 --completion_len=48

Writes benchmarks/results/train_step_mfu_<platform>_<shape>.md. The issue's goal on an
accelerator is 40% MFU or more.
"""

from __future__ import annotations

import argparse
import os

import common

SHAPES = {"qwen3-1.7b": common.QWEN3_1_7B, "toy": common.QWEN3_TOY}
DATASHEET_BF16_TFLOPS = {"NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0}  # dense, no sparsity


def model_flops(cfg, rows: int, prompt_len: int, completion_len: int) -> int:
    seq = prompt_len + completion_len
    head = cfg.vocab_size * cfg.hidden_size
    body = cfg.num_params() - head
    return (6 * body * rows * seq + 6 * head * rows * completion_len
            + 12 * cfg.num_layers * rows * seq * seq * cfg.num_heads * cfg.head_dim)


def matmul_peak(dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` jitted size^3 matmuls in `dtype`."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    return 2 * size**3 / min(common.wall_times(jax.jit(lambda a: a @ a), a, repeats=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--completion_len", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bridge import advantages as adv_lib, train_state
    from bridge.models import Decoder, config as model_config
    from bridge.stages import rl
    from configs.common import rl_stage, sampling

    dtype = model_config.dtype_from_name(args.dtype)
    cfg = common.model_config(SHAPES[args.shape], dtype=dtype, param_dtype=jnp.float32, remat=True,
                              scan_layers=True, max_position_embeddings=args.prompt_len + args.completion_len)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    scfg = rl_stage("policy", lr=1e-6, steps=1, prompts_per_step=1,
                    sampling=sampling(args.rows, max_new_tokens=args.completion_len))
    tx = train_state.make_optimizer(scfg.optimizer)
    step = train_state.make_update_step(graphdef, rl.make_loss_fn(scfg), tx)
    state = train_state.init_state(params, tx)
    rng = np.random.default_rng(0)
    rewards = jnp.asarray(rng.integers(0, 2, args.rows), jnp.float32)
    batch = {
        "prompt_tokens": jnp.asarray(rng.integers(1, cfg.vocab_size, (args.rows, args.prompt_len)), jnp.int32),
        "prompt_mask": jnp.ones((args.rows, args.prompt_len), bool),
        "tokens": jnp.asarray(rng.integers(1, cfg.vocab_size, (args.rows, args.completion_len)), jnp.int32),
        "mask": jnp.ones((args.rows, args.completion_len), bool),
        "advantages": adv_lib.advantage_estimator("grpo")(rewards, args.rows),
        "row_weight": jnp.ones((args.rows,), jnp.float32),
        "tis_weight": jnp.ones((args.rows, args.completion_len), jnp.float32),
        "old_logp": jnp.full((args.rows, args.completion_len), -5.0, jnp.float32),
    }
    (state, metrics), compile_s, _ = common.timed(step, state, batch, None)
    times = []
    for _ in range(args.repeats):
        (state, metrics), seconds, _ = common.timed(step, state, batch, None)
        times.append(seconds)
    flops = model_flops(cfg, args.rows, args.prompt_len, args.completion_len)
    peak = matmul_peak(dtype, 8192 if jax.default_backend() != "cpu" else 1024)
    median = float(np.median(times))
    device = jax.devices()[0].device_kind
    sheet = DATASHEET_BF16_TFLOPS.get(device) if args.dtype == "bfloat16" else None
    rows = [
        "| model TFLOPs / step | step s (median / min) | TFLOP/s | measured matmul peak TFLOP/s | MFU vs measured peak |"
        + (" MFU vs datasheet |" if sheet else ""),
        "|---:|---:|---:|---:|---:|" + ("---:|" if sheet else ""),
        f"| {flops / 1e12:.2f} | {median:.3f} / {min(times):.3f} | {flops / median / 1e12:.1f} | {peak / 1e12:.1f} "
        f"| {flops / median / peak:.1%} |" + (f" {flops / median / (sheet * 1e12):.1%} |" if sheet else ""),
        "", f"First (compiling) step {compile_s:.1f} s; loss after the timed steps {float(metrics['loss']):.4f}."]
    common.write_report(
        f"train_step_mfu_{jax.default_backend()}_{args.shape}", f"GRPO train step MFU: {args.shape}, {args.dtype}",
        [f"Model: {common.describe_model(cfg)}; f32 master params, {args.dtype} compute, scanned layers, remat. "
         f"Batch: {args.rows} rows x ({args.prompt_len} prompt + {args.completion_len} completion) tokens. "
         f"{args.repeats} timed steps after the compiling one; the peak is the best {'8192' if jax.default_backend() != 'cpu' else '1024'}^3 "
         f"{args.dtype} matmul here."],
        rows, common.jax_versions(), common.load_note(load_before))


if __name__ == "__main__":
    main()
