"""Greedy decoding speed: bridge.sampling.generate vs transformers `generate`, same weights.

A random Qwen3-shaped model (4 layers, hidden 256, MLP 768, 4 heads / 2 kv heads of 64,
vocab 32000, tied embeddings) is built with transformers, saved as safetensors and loaded by
both. Same prompts (PROMPT_LEN random tokens per row), greedy, exactly NEW_TOKENS new tokens
(no eos), CPU float32, batch 1, 8 and 32. Each side is warmed up (compiled) once, then timed
end to end (Python lists / tensors in, tokens on the host out) REPEATS times; the median is
reported as new tokens per second. torch runs with as many threads as XLA's CPU client has
cores. Writes benchmarks/results/sampler_vs_hf.md.

    .venv/bin/python benchmarks/sampler_vs_hf.py
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bridge import models, sampling  # noqa: E402

BATCHES = (1, 8, 32)
PROMPT_LEN = 32
NEW_TOKENS = 64
REPEATS = 5
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sampler_vs_hf.md")

MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
             rope_theta=1_000_000.0, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)


def build_model(path: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**MODEL)).eval()
    with torch.no_grad():  # wider than the default init so greedy paths are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: compilation (ours) / first-call allocations (torch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_fn(model, prompts):
    def run():
        out = sampling.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
        return np.asarray(out.tokens)
    return run


def hf_fn(model, prompts):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return out[:, PROMPT_LEN:].numpy()
    return run


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    threads = os.cpu_count()  # XLA's CPU client uses every core
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as path:
        hf_model = build_model(path)
        model = models.load_hf(path)
        for batch in BATCHES:
            prompts = rng.integers(0, MODEL["vocab_size"], (batch, PROMPT_LEN)).tolist()
            ours, theirs = ours_fn(model, prompts), hf_fn(hf_model, prompts)
            agree = float(np.mean(ours() == theirs()))
            t_ours, t_hf = timed(ours, REPEATS), timed(theirs, REPEATS)
            tps_ours, tps_hf = batch * NEW_TOKENS / t_ours, batch * NEW_TOKENS / t_hf
            rows.append((batch, tps_ours, tps_hf, tps_ours / tps_hf, agree))
            print(f"batch {batch}: ours {tps_ours:.0f} tok/s, transformers {tps_hf:.0f} tok/s, "
                  f"ratio {tps_ours / tps_hf:.2f}x, greedy tokens equal {agree:.1%}", flush=True)
    table = ["| batch | bridge tok/s | transformers tok/s | ratio | same greedy tokens |",
             "|---:|---:|---:|---:|---:|"]
    table += [f"| {b} | {o:.0f} | {h:.0f} | {r:.2f}x | {a:.1%} |" for b, o, h, r, a in rows]
    machine = (f"{cpu_name()}, {os.cpu_count()} cores visible, {threads} threads each side; "
               f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
               f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    text = "\n".join([
        "# Sampler vs transformers generate (CPU, float32)", "",
        f"Qwen3-shaped random model: {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"MLP {MODEL['intermediate_size']}, {MODEL['num_attention_heads']} heads / "
        f"{MODEL['num_key_value_heads']} kv heads x {MODEL['head_dim']}, vocab {MODEL['vocab_size']}, tied "
        f"embeddings. Greedy, {PROMPT_LEN}-token prompts, exactly {NEW_TOKENS} new tokens, end-to-end "
        f"median of {REPEATS} runs after one warm-up run.", "",
        f"Machine: {machine}.", "",
        "Command: `.venv/bin/python benchmarks/sampler_vs_hf.py`", "",
        *table, ""])
    print("\n" + "\n".join(table))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(text)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
