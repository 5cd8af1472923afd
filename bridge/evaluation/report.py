"""Evaluation outputs: results.json, a markdown table, PNG plots, samples.jsonl, multi-run tables.

A results dict (from `bridge.evaluation.runner.evaluate`) holds "task", "method", "seed",
"model", "split", "num_problems", "n", "ks", "sampling", "metrics" (flat: "avg@16", "pass@k",
"maj@k", "mean_response_length", "mean_token_entropy", "format_rate", "truncated_rate", and
with a reference model "kl_to_reference" and "kl_to_reference_per_token") and "samples" (one
dict per completion).

KL metrics (`bridge.evaluation.runner`): for each sampled completion y, the exact
full-vocabulary per-position KL(pi_T(. | x, y_<t) || pi_ref,T(. | x, y_<t)) summed over y's
tokens, both models' softmax at the sampling temperature T (1 for greedy) before top-k / top-p:
the Rao-Blackwellized reverse-KL estimator, >= 0. "kl_to_reference" is its mean over
completions (sequence KL, nats); "kl_to_reference_per_token" is its total over all completion
tokens divided by their number (nats per token).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np

RESULTS_FILE = "results.json"
SUMMARY_ROWS = (
    "mean_response_length",
    "mean_token_entropy",
    "kl_to_reference",
    "kl_to_reference_per_token",
    "format_rate",
    "truncated_rate",
)

KL_NOTE = (
    "kl_to_reference: mean over completions y of sum_t KL(pi(.|x,y<t) || pi_ref(.|x,y<t)), exact over "
    "the vocabulary at temperature {temperature} before top-k/top-p (Rao-Blackwellized reverse KL, "
    "nats per sequence); kl_to_reference_per_token: the same total / completion tokens."
)


def metric_value(results: dict, metric: str) -> float | None:
    """A metric by name; "avg" / "pass" / "maj" alone mean that metric at k = n."""
    metrics = results["metrics"]
    if metric in ("avg", "pass", "maj"):
        metric = f"{metric}@{results['n']}"
    return metrics.get(metric)


def results_markdown(results: dict) -> str:
    """One run: sampling settings, pass@k / maj@k by k, and the summary metrics."""
    s = results["sampling"]
    lines = [
        f"## {results['task']} ({results['split']}, {results['num_problems']} problems) — "
        f"{results.get('method') or results.get('model', '')}",
        "",
        f"n={results['n']}, temperature={s['temperature']}, top_p={s['top_p']}, top_k={s['top_k']}, "
        f"max_new_tokens={s['max_new_tokens']}, seed={results.get('seed')}",
        "",
        "| k | avg@k | pass@k | maj@k |",
        "|---:|---:|---:|---:|",
    ]
    m = results["metrics"]
    for k in results["ks"]:
        lines.append(
            f"| {k} | {_fmt(m.get(f'avg@{k}'))} | {_fmt(m[f'pass@{k}'])} | " f"{_fmt(m[f'maj@{k}'])} |"
        )
    lines += ["", "| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(m[name])} |" for name in SUMMARY_ROWS if name in m]
    if "kl_to_reference" in m:
        lines += ["", KL_NOTE.format(temperature=s["temperature"] if s["temperature"] > 0 else 1.0)]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot_pass_at_k(runs: Sequence[tuple[str, dict]], path: str) -> None:
    """pass@k (solid) and maj@k (dashed) against k (log2 axis), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for index, (label, results) in enumerate(runs):
        ks = results["ks"]
        colour = f"C{index % 10}"
        ax.plot(
            ks, [results["metrics"][f"pass@{k}"] for k in ks], "o-", color=colour, label=f"{label} pass@k"
        )
        ax.plot(ks, [results["metrics"][f"maj@{k}"] for k in ks], "s--", color=colour, label=f"{label} maj@k")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(runs[0][1]["task"] if len(runs) == 1 else "pass@k")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_vs_kl(points: Sequence[tuple[str, float, float]], path: str, metric: str = "avg") -> None:
    """Scatter of (label, KL to the reference/base model, accuracy), one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for index, (label, kl, accuracy) in enumerate(points):
        ax.scatter([kl], [accuracy], color=f"C{index % 10}", label=label)
    ax.set_xlabel("sequence KL to reference (nats)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(results: dict, outdir: str) -> dict[str, str]:
    """Writes results.json (without samples), results.md, passk.png and samples.jsonl."""
    os.makedirs(outdir, exist_ok=True)
    paths = {
        name: os.path.join(outdir, name)
        for name in (RESULTS_FILE, "results.md", "passk.png", "samples.jsonl")
    }
    summary = {k: v for k, v in results.items() if k != "samples"}
    with open(paths[RESULTS_FILE], "w") as f:
        json.dump(summary, f, indent=2)
    with open(paths["results.md"], "w") as f:
        f.write(results_markdown(results))
    with open(paths["samples.jsonl"], "w") as f:
        for sample in results.get("samples", []):
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    plot_pass_at_k([(results.get("method") or results["task"], results)], paths["passk.png"])
    return paths


def load_results(path: str) -> dict:
    """results.json from a results folder (or the file itself)."""
    file = os.path.join(path, RESULTS_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"No {RESULTS_FILE} in {path!r}; run launch.eval with --outdir there.")
    with open(file) as f:
        return json.load(f)


def gather_table(result_dirs: Sequence[str], metric: str = "avg") -> str:
    """Paper-style markdown: rows = methods, columns = benchmarks (tasks), mean ± std over seeds.

    A run's method is results["method"] (launch.eval --method), else its folder's parent name.
    """
    cells: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    methods, benchmarks = [], []
    for directory in result_dirs:
        results = load_results(directory)
        method = results.get("method") or os.path.basename(os.path.dirname(os.path.abspath(directory)))
        value = metric_value(results, metric)
        if value is None:
            raise ValueError(f"{directory}: no metric {metric!r} (has {sorted(results['metrics'])}).")
        cells[(method, results["task"])].append(value)
        methods += [method] if method not in methods else []
        benchmarks += [results["task"]] if results["task"] not in benchmarks else []
    percent = metric not in SUMMARY_ROWS
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    lines = [f"| method | {' | '.join(benchmarks)} |", "|---|" + "---:|" * len(benchmarks)]
    for method in methods:
        row = []
        for benchmark in benchmarks:
            values = scale * np.asarray(cells.get((method, benchmark), []), np.float64)
            if values.size == 0:
                row.append("-")
            elif values.size == 1:
                row.append(f"{values[0]:.{digits}f}")
            else:
                row.append(f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f} (n={values.size})")
        lines.append(f"| {method} | {' | '.join(row)} |")
    unit = "%, " if percent else ""
    return f"{metric} ({unit}mean ± std over seeds)\n\n" + "\n".join(lines) + "\n"
