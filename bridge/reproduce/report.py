"""The reproduction's outputs from its results dict: <outdir>/results.json (everything),
table.md (mean +- sample std over seeds, the seed count, then per-seed values, starting skills
per seed, and the tuned rows' budget tables) and plots/ (bars with error bars per row; accuracy
against KL to the base; held-out learning curves per stage with a band over seeds)."""

from __future__ import annotations

import json
import os

import numpy as np


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not len(values):
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _cell(values, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def columns(results: dict) -> list[tuple[str, str, str]]:
    """(header, eval set, metric) of the main table: per eval set greedy and avg@n, pass@n and
    the KL to the base on the test set."""
    n = int(results["spec"]["sampling"]["n"])
    out = []
    for name in results["spec"]["evals"]:
        out += [(f"{name} greedy", name, "greedy"), (f"{name} avg@{n}", name, f"avg@{n}")]
        if name == "test":
            out += [(f"test pass@{n}", name, f"pass@{n}"), ("KL to base (test)", name, "kl_to_base")]
    return out


def _values(results: dict, row: str, eval_set: str, metric: str) -> list:
    return [results["evaluations"][row][str(s)].get(eval_set, {}).get(metric) for s in results["seeds"]]


def _label(results: dict, row: dict) -> str:
    sel = results["selected"].get(row["name"])
    if not sel:
        return row["label"]
    key = row["sweep"][0].rsplit(".", 1)[-1] if row["sweep"] else ""
    parts = ([f"{key} {sel['value']}"] if key else []) + ([f"{sel['budget']} steps"] if sel["budget"] else [])
    return f"{row['label']} ({', '.join(parts)})"


def markdown(results: dict) -> str:
    seeds = results["seeds"]
    cols = columns(results)
    spec = results["spec"]
    lines = [f"Seeds {', '.join(map(str, seeds))} ({len(seeds)}); mean ± std over seeds (sample std). "
             f"{spec['prompts']} problems per eval set; greedy, and {spec['sampling']['n']} samples at T = "
             f"{spec['sampling']['temperature']}, top-p {spec['sampling']['top_p']}, top-k {spec['sampling']['top_k']} "
             "(avg@n, unbiased pass@n). Rollouts: sampled completions; updates: optimizer steps; both over the "
             "row's model and every stage it depends on (the teacher's for a distilled student), mean over seeds.", "",
             "| row | " + " | ".join(c[0] for c in cols) + " | rollouts | updates |",
             "|---|" + "---:|" * (len(cols) + 2)]
    for row in results["rows"]:
        b = results["budgets"][row["name"]]
        cells = [_cell(_values(results, row["name"], e, m)) for _, e, m in cols]
        rollouts = np.mean([b[str(s)]["rollouts"] for s in seeds])
        updates = np.mean([b[str(s)]["updates"] for s in seeds])
        lines.append(f"| {_label(results, row)} | " + " | ".join(cells) + f" | {rollouts:,.0f} | {updates:,.0f} |")
    lines += ["", "Per seed (test greedy / test avg@n):", "",
              "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    n = spec["sampling"]["n"]
    for row in results["rows"]:
        greedy = _values(results, row["name"], "test", "greedy")
        avg = _values(results, row["name"], "test", f"avg@{n}")
        lines.append(f"| {row['name']} | " + " | ".join(
            "-" if g is None else f"{g:.3f} / {a:.3f}" for g, a in zip(greedy, avg)) + " |")
    if spec.get("skills"):
        lines += ["", "Starting skills per seed (the step each stage ended at, its test accuracy at the end-of-stage evaluation of the config, `config.eval`):", "",
                  "| seed | " + " | ".join(spec["skills"]) + " |", "|---|" + "---:|" * len(spec["skills"])]
        for s in seeds:
            got = results["skills"][str(s)]
            lines.append(f"| {s} | " + " | ".join(
                f"{got[u]['steps']} steps: {got[u]['accuracy']:.3f}" if u in got else "-" for u in spec["skills"]) + " |")
    for name, table in results["sweeps"].items():
        row = next(r for r in results["rows"] if r["name"] == name)
        key = row["sweep"][0] if row["sweep"] else "value"
        sel = results["selected"][name]
        lines += ["", f"{row['label']}: held-out greedy accuracy (validation / test curve, mean ± std) by `{key}` "
                  f"and steps; selected on validation: {sel['value']} at {sel['budget']} steps.", "",
                  "| " + key.rsplit(".", 1)[-1] + " | steps | validation | test |", "|---|---:|---:|---:|"]
        for e in table:
            mark = " **(selected)**" if (e["value"], e["budget"]) == (sel["value"], sel["budget"]) else ""
            lines.append(f"| {e['value']} | {e['budget']}{mark} | {_cell(e['validation'])} | {_cell(e['test'])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, outdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    n = results["spec"]["sampling"]["n"]
    rows = results["rows"]
    names = [r["name"] for r in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.6))
    width = 0.38
    for i, (metric, label) in enumerate((("greedy", "greedy"), (f"avg@{n}", f"avg@{n}"))):
        stats = [mean_std(_values(results, name, "test", metric)) for name in names]
        ax.bar(np.arange(len(names)) + (i - 0.5) * width, [m for m, _ in stats], width,
               yerr=[s for _, s in stats], capsize=3, label=label)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results['family']}: mean ± std over {len(results['seeds'])} seeds")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(outdir, "bars.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for name in names:
        kl = mean_std(_values(results, name, "test", "kl_to_base"))
        acc = mean_std(_values(results, name, "test", f"avg@{n}"))
        if not np.isnan(kl[0]):
            ax.errorbar(kl[0], acc[0], xerr=kl[1], yerr=acc[1], fmt="o", capsize=3, label=name)
    ax.set_xlabel("KL to the base (nats per completion, test samples)")
    ax.set_ylabel(f"test avg@{n}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(outdir, "accuracy_vs_kl.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    curves = [c for c in results["curves"] if any(c["seeds"].values())]
    stages = list(dict.fromkeys(c["stage"] for c in curves))
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.2), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            for c in (c for c in curves if c["stage"] == stage):
                per_seed = [dict(map(tuple, v)) for v in c["seeds"].values() if v]
                steps = sorted(set.intersection(*(set(d) for d in per_seed)))
                if not steps:
                    continue
                values = np.array([[d[s] for s in steps] for d in per_seed])
                mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
                shared = f" (+{len(c['runs']) - 1} runs)" if len(c["runs"]) > 1 else ""
                ax.plot(steps, mean, label=c["runs"][0] + shared)
                ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("held-out greedy accuracy")
        fig.tight_layout()
        paths.append(os.path.join(outdir, "curves.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def load(outdir: str) -> dict:
    path = os.path.join(outdir, "results.json")
    if not os.path.exists(path):
        raise ValueError(f"No {path}: run launch.reproduce without --report_only first.")
    with open(path) as f:
        return json.load(f)


def write(results: dict, outdir: str) -> str:
    os.makedirs(outdir, exist_ok=True)
    table = markdown(results)
    with open(os.path.join(outdir, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    plot(results, os.path.join(outdir, "plots"))
    return table


def replace_section(text: str, family: str, table: str) -> str:
    """`text` (a README) with the lines between <!-- reproduce:<family> --> and
    <!-- /reproduce:<family> --> replaced by `table`."""
    start, end = f"<!-- reproduce:{family} -->", f"<!-- /reproduce:{family} -->"
    if start not in text or end not in text:
        raise ValueError(f"The README has no {start} ... {end} section to write the table into.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}{end}{tail}"
