"""ERPD's reports, in the paper's layout: one row per exported unit (round, role, the model it
started from, accuracy, KL to the base, entropy, length, train time) written to
`erpd_table.md`, and the KL-efficiency plot `plots/erpd_kl_efficiency.png` (accuracy against
the KL to the base model, one curve for the teachers and one for the students, in round
order, from the base at KL 0).

The KL is the evaluation's `kl_to_reference` with `eval.kl_reference` the base: the exact
full-vocabulary KL(pi || pi_base) summed along completions sampled from pi.
"""

from __future__ import annotations

import os

from bridge import runtime

ROLES = {"erpd_teacher": "teacher", "erpd_distill": "student", "rl": "rl", "sft": "base"}
COLUMNS = ("round", "role", "unit", "init", "accuracy", "kl_to_base", "entropy", "response_length", "train_time_s")


def table_rows(cfg, results: dict) -> list[dict]:
    """One dict per evaluated unit, in run order; `init` names the unit whose model the unit
    started from (the last writer of its init slot) or the slot itself."""
    writer, rows = {}, []
    for unit in (u for u, _, _ in runtime.pipeline_units(cfg)):
        if unit.id not in results:
            continue
        scfg = runtime.for_iteration(cfg.stages[unit.stage], unit.iteration)
        init = scfg.get("init") or scfg.model
        r = results[unit.id]
        if "accuracy" in r:
            rows.append({"round": unit.iteration, "role": ROLES.get(scfg.kind, scfg.kind), "unit": unit.id,
                         "init": writer.get(init, init), "accuracy": r["accuracy"],
                         "kl_to_base": r.get("kl_to_reference"), "entropy": r.get("entropy"),
                         "response_length": r.get("response_length"), "train_time_s": r.get("train_time_s")})
        writer[scfg.model] = unit.id
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_kl_efficiency(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["role"] == "base"), None)
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for role, marker in (("teacher", "s"), ("student", "o"), ("rl", "^")):
        pts = [(r["kl_to_base"], r["accuracy"]) for r in rows if r["role"] == role and r["kl_to_base"] is not None]
        if base is not None and pts:
            pts = [(0.0, base["accuracy"])] + pts
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=role)
    ax.set_xlabel("KL to the base (per completion)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summarize(cfg, workdir: str, results: dict) -> dict:
    rows = table_rows(cfg, results)
    with open(os.path.join(workdir, "erpd_table.md"), "w") as f:
        f.write(markdown(rows))
    out = {"erpd_table": rows}
    if cfg.metrics.plots:
        out["erpd_plot"] = plot_kl_efficiency(rows, os.path.join(workdir, "plots", "erpd_kl_efficiency.png"))
    return out
