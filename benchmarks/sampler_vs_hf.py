"""Greedy decoding speed: bridge.sampling.generate vs transformers `generate`, same weights.

The model of common.write_hf_model (a random Qwen3-shaped model, 4 layers, hidden 256, MLP 768,
4 heads / 2 kv heads of 64, vocab 32000, tied embeddings) built with transformers, saved as
safetensors and loaded by both. Same prompts (PROMPT_LEN random tokens per row), greedy, exactly
NEW_TOKENS new tokens (no eos: transformers gets min_new_tokens), CPU float32, batch 1, 8 and 32.

Each thread setting runs in its own process, because XLA reads its thread settings once:
"all" = every core for both (torch.set_num_threads(cores), XLA's default thread pool), and
"1" = the process pinned to one core with one thread on each side. Each side is warmed up
(compiled) once, then the two are timed alternately, end to end (Python lists in, tokens on the
host out), common.SAMPLER_REPEATS times; the best wall time of each is reported as new tokens/s,
and with one thread also the ratio of best process CPU times, the figure least disturbed by other
work on a shared machine (the load average is recorded too); see common.compare_samplers. Writes
benchmarks/results/sampler_vs_hf.md.

    .venv/bin/python benchmarks/sampler_vs_hf.py                 # threads "all" and "1"
    .venv/bin/python benchmarks/sampler_vs_hf.py --threads all
"""

from __future__ import annotations

import os

import common

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def worker(path: str, threads: str) -> dict:
    """Times both samplers in this process with the given thread setting; returns the rows."""
    load_before = os.getloadavg()[0]
    import jax
    import torch
    import transformers

    torch.set_num_threads(1 if threads == "1" else os.cpu_count())
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def transformers_generate(prompts):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=common.NEW_TOKENS, min_new_tokens=common.NEW_TOKENS,
                                    do_sample=False, pad_token_id=0)
        return out[:, common.PROMPT_LEN:].numpy()

    rows = common.compare_samplers(common.bridge_sampler(path),
                                   lambda prompts: common.timed(transformers_generate, prompts),
                                   "transformers", threads)
    return dict(threads=threads, rows=rows, load=common.load_note(load_before),
                versions=f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")


def report(results: list[dict]) -> None:
    common.write_sampler_report(
        "sampler_vs_hf", "Sampler vs transformers generate (CPU, float32)", "transformers",
        "transformers: `generate(do_sample=False, min_new_tokens=max_new_tokens)` in the same process.",
        ["With all threads on a machine whose load exceeds its cores, torch's OpenMP threads spin-wait and "
         "transformers slows down many times, so read those rows with the load average below."], results)


def main() -> None:
    common.run_sampler_benchmark(__doc__.split("\n")[0], worker, report)


if __name__ == "__main__":
    main()
