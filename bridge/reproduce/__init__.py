"""A family's paper table from runs: every row for every seed, shared stages run once per seed,
each row evaluated the same way, mean +- std over seeds (`launch.reproduce`).

A family config module (configs/<family>/<name>.py) declares `reproduction(arg)`, for the same
variant argument as its `get_config(arg)`, returning:
  rows        name -> dict(label, variant, unit[, sweep=(config key, values), budgets=(steps...)]):
              the row reports the model of `unit` after the pipeline of `get_config(variant)`;
              a sweep runs one pipeline per value and, with budgets, trains the unit max(budgets)
              steps, snapshots it at each budget, and reports the (value, budget) whose mean
              validation accuracy over seeds is highest (a baseline tuned like the method)
  seeds       default seeds
  evals       eval set name -> task option overrides ("test" = the run's task): each row's model is
              evaluated greedy and at `sampling` (avg@n and unbiased pass@k) on `prompts` problems
  validation  task option overrides of the selection split (its test split), curve-evaluated
  curve_every every stage's held-out greedy accuracy (test and validation) every so many steps
  kl_reference the unit whose model is the base for "KL to base" (a run's own unit of that name)
  skills      units whose reached step and accuracy show each seed's starting skills
Runs live in <workdir>/seed<k>/<run>/ (a normal workdir: resumable, `launch.train`'s layout);
units equal across runs (`plan.unit_keys`) are linked, not re-run. Results: <outdir>/table.md,
results.json and plots/ (`report`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from bridge import metrics as metrics_lib, runtime
from bridge.reproduce import plan, report

# the curve keys written by runtime.held_out_curve
TEST_CURVE, VALIDATION_CURVE = "held_out_accuracy", "held_out_validation_accuracy"


@dataclasses.dataclass(frozen=True)
class Run:
    """One pipeline run per seed: `variant`'s config, its `sweep` key set to `value`, with
    snapshots of unit `budget_unit` at `budgets`, run up to unit `last_unit` (a unit inside a
    repeated block runs with its whole block)."""

    name: str
    variant: str
    last_unit: str
    sweep_key: str = ""
    value: object = None
    budget_unit: str = ""
    budgets: tuple = ()


def _run_name(row: plan.Row, value) -> str:
    if not row.sweep:
        return row.variant
    return f"{row.name}.{row.sweep[0].rsplit('.', 1)[-1]}={value}"


def plan_runs(module, base_parts, rows) -> tuple[dict[str, Run], dict[tuple, str]]:
    """The runs the rows need, and (row name, sweep value) -> run name. Rows of one variant
    without a sweep share its run, which goes as far as the furthest unit they report."""
    runs, of_row = {}, {}
    for row in rows:
        units = [u.id for u, _, _ in runtime.pipeline_units(module.get_config(",".join([*base_parts, row.variant])))]
        if row.unit not in units:
            raise ValueError(f"Row {row.name!r}: unit {row.unit!r} is not a unit of variant {row.variant!r}'s "
                             f"pipeline {tuple(units)}.")
        for value in row.sweep[1] if row.sweep else (None,):
            name = _run_name(row, value)
            last = row.unit
            if name in runs and units.index(runs[name].last_unit) > units.index(last):
                last = runs[name].last_unit
            runs[name] = Run(name, row.variant, last, row.sweep[0] if row.sweep else "", value,
                             row.unit if row.budgets else "", tuple(row.budgets))
            of_row[row.name, value] = name
    return runs, of_row


def _up_to(cfg, unit_id: str) -> tuple:
    """The pipeline's entries up to the one that runs `unit_id` (its stage, or its block)."""
    stage, entries = unit_id.split("@")[0], list(cfg.pipeline.stages)
    for i, entry in enumerate(entries):
        if entry == stage or (entry.startswith("block:") and stage in cfg.pipeline.blocks[entry[6:]].stages):
            return tuple(entries[: i + 1])
    raise ValueError(f"Unit {unit_id!r} is not in the pipeline {tuple(entries)}.")


def run_config(module, base_parts, spec: dict, run: Run, seed: int, progress: bool):
    cfg = module.get_config(",".join([*base_parts, run.variant]))
    cfg.unlock()
    cfg.seed = seed
    prompts = min(int(spec["prompts"]), int(cfg.eval.num_prompts))
    cfg.eval.update(every=int(spec["curve_every"]), curve_prompts=prompts)
    cfg.eval.curve_tasks = {"validation": dict(spec["validation"])}
    if run.sweep_key:
        *parents, last = run.sweep_key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = type(node[last])(run.value)
    if run.budgets:
        stage = cfg.stages[run.budget_unit.split("@")[0]]
        stage.steps = max(run.budgets)
        stage.export_steps = tuple(b for b in run.budgets if b < max(run.budgets))
    cfg.pipeline.stages = _up_to(cfg, run.last_unit)
    cfg.metrics.update(progress=progress, tensorboard=False, plots=False)
    cfg.lock()
    return cfg


def train(module, base_parts, spec, runs: dict[str, Run], seeds, workdir: str, progress: bool) -> dict:
    """Runs (or resumes) every run for every seed, linking units already finished by another
    run of the same seed; returns {(seed, run name): config}."""
    configs = {}
    for seed in seeds:
        done = {}
        for run in runs.values():
            cfg = configs[seed, run.name] = run_config(module, base_parts, spec, run, seed, progress)
            run_dir = os.path.join(workdir, f"seed{seed}", run.name)
            for unit_id, key in plan.unit_keys(cfg).items():
                if plan.finished(run_dir, unit_id):
                    done.setdefault(key, plan.real_unit(run_dir, unit_id))
        for run in runs.values():
            cfg = configs[seed, run.name]
            run_dir = os.path.join(workdir, f"seed{seed}", run.name)
            os.makedirs(run_dir, exist_ok=True)
            keys = plan.unit_keys(cfg)
            linked = plan.link_shared(run_dir, keys, done)
            if linked:
                print(f"seed {seed} {run.name}: reusing {', '.join(linked)}", flush=True)
            print(f"seed {seed} {run.name}: {' -> '.join(cfg.pipeline.stages)}", flush=True)
            runtime.run_pipeline(cfg, run_dir)
            for unit_id, key in keys.items():
                done.setdefault(key, plan.real_unit(run_dir, unit_id))
    return configs


def _records(run_dir: str, unit_id: str) -> list[dict]:
    source, source_id = plan.real_unit(run_dir, unit_id)
    return metrics_lib.read_metrics(source).get(source_id, [])


def _at_step(records, step: int, key: str):
    return next((r[key] for r in records if r["step"] == step and key in r), None)


def select(row: plan.Row, run_of, seeds, workdir: str) -> tuple[tuple, list[dict]]:
    """The tuned row's (value, budget) with the best mean validation accuracy over seeds (ties:
    the smaller budget, then the first value), and the budget table: one entry per (value,
    budget) with the per-seed validation and test curve accuracies at that step."""
    values = row.sweep[1] if row.sweep else (None,)
    budgets = row.budgets or (None,)
    table = []
    for value in values:
        for budget in budgets:
            entry = {"value": value, "budget": budget, "validation": [], "test": []}
            for seed in seeds:
                records = _records(os.path.join(workdir, f"seed{seed}", run_of[row.name, value]), row.unit)
                step = budget or (records[-1]["step"] if records else 0)
                entry["validation"].append(_at_step(records, step, VALIDATION_CURVE))
                entry["test"].append(_at_step(records, step, TEST_CURVE))
            table.append(entry)
    scored = [e for e in table if None not in e["validation"]]
    if not scored:
        raise ValueError(f"Row {row.name!r}: no validation accuracy at the budgets {row.budgets} (curve_every must "
                         "divide every budget).")
    best = max(scored, key=lambda e: (np.mean(e["validation"]), -(e["budget"] or 0), -values.index(e["value"])))
    return (best["value"], best["budget"]), table


def _evaluate(ctx, model, reference, spec: dict, cfg) -> dict:
    """Greedy accuracy and avg@n / pass@k at the family's sampling settings on every eval set;
    the KL to the base on the test set's samples."""
    from bridge.evaluation import runner

    s = spec["sampling"]
    prompts = min(int(spec["prompts"]), int(cfg.eval.num_prompts))
    common = dict(max_new_tokens=int(cfg.eval.max_new_tokens), limit=prompts, batch_size=int(cfg.eval.batch_size),
                  eos_ids=ctx.eos_ids, mesh=ctx.mesh, rules=ctx.rules, progress=False, seed=int(cfg.seed))
    out = {}
    for name, overrides in spec["evals"].items():
        task = ctx.task_with(dict(overrides))
        greedy = runner.evaluate(model, ctx.tokenizer, task, n=1, temperature=0.0, top_p=1.0, top_k=0, **common)
        sampled = runner.evaluate(model, ctx.tokenizer, task, n=int(s["n"]), temperature=float(s["temperature"]),
                                  top_p=float(s["top_p"]), top_k=int(s["top_k"]),
                                  reference_model=reference if name == "test" else None, **common)
        m = sampled["metrics"]
        out[name] = {"greedy": greedy["metrics"]["avg@1"], **{k: v for k, v in m.items() if k.startswith(("avg@", "pass@"))}}
        if "kl_to_reference" in m:
            out[name]["kl_to_base"] = m["kl_to_reference"]
    return out


def evaluate(spec, rows, selected, run_of, runs, configs, seeds, workdir: str) -> dict:
    """{row: {seed: evaluation}} of each row's model (a tuned row's selected snapshot), cached
    in <workdir>/evals/ by the model's unit key and the evaluation settings."""
    out = {}
    settings = {k: spec[k] for k in ("evals", "sampling", "prompts")}
    for row in rows:
        value, budget = selected.get(row.name, (None, None))
        out[row.name] = {}
        for seed in seeds:
            run = runs[run_of[row.name, value]]
            cfg = configs[seed, run.name]
            run_dir = os.path.join(workdir, f"seed{seed}", run.name)
            keys = plan.unit_keys(cfg)
            final = budget is None or budget == max(run.budgets)
            path = os.path.join(run_dir, "models", row.unit) if final else \
                os.path.join(run_dir, "artifacts", row.unit, f"step{budget}")
            cache = os.path.join(workdir, "evals", f"{keys[row.unit]}{'' if final else f'.step{budget}'}.json")
            if os.path.exists(cache):
                with open(cache) as f:
                    saved = json.load(f)
                if saved["settings"] == json.loads(json.dumps(settings)):
                    out[row.name][str(seed)] = saved["results"]
                    continue
            ctx = runtime.read_context(cfg, run_dir)
            base = spec.get("kl_reference")
            reference = ctx.load(os.path.join(run_dir, "models", base)) if base and base in keys else None
            results = _evaluate(ctx, ctx.load(path), reference, spec, cfg)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "w") as f:
                json.dump({"settings": settings, "results": results}, f, indent=2)
            out[row.name][str(seed)] = results
            print(f"seed {seed} {row.name}: " + ", ".join(f"{k} greedy {v['greedy']:.3f}" for k, v in results.items()),
                  flush=True)
    return out


def _stage_results(run_dir: str, unit_id: str) -> dict:
    with open(os.path.join(run_dir, "stages", unit_id, "DONE.json")) as f:
        return json.load(f)["results"]


def budget_of(cfg, run_dir: str, last_unit: str, budget=None) -> dict:
    """Sampled completions (`StageKind.rollouts`) and optimizer updates (each unit's measured
    `optimizer_updates`; a snapshot's share of them) of `last_unit` and every unit it depends on
    (`plan.unit_graph`: the teacher's stages for a distilled student, not for direct GRPO), for
    the steps each stage ran (`budget` for `last_unit` when given)."""
    from bridge import stages

    needed = plan.unit_graph(cfg)[last_unit][1] | {last_unit}
    rollouts = updates = 0
    for unit, scfg, _ in runtime.pipeline_units(cfg):
        if unit.id not in needed:
            continue
        results = _stage_results(run_dir, unit.id)
        steps = budget if unit.id == last_unit and budget else int(results["steps"])
        updates += round(int(results["optimizer_updates"]) * steps / max(int(results["steps"]), 1))
        rollouts += stages.kind(scfg.kind).rollouts(cfg, scfg, steps)
    return {"rollouts": rollouts, "updates": updates}


def collect(spec, rows, selected, run_of, runs, configs, seeds, workdir: str) -> dict:
    """Per row and seed: budgets; per seed: starting skills; per run, unit and seed: curves."""
    budgets, skills, curves = {}, {}, {}
    for row in rows:
        value, budget = selected.get(row.name, (None, None))
        budgets[row.name] = {}
        for seed in seeds:
            run = runs[run_of[row.name, value]]
            run_dir = os.path.join(workdir, f"seed{seed}", run.name)
            budgets[row.name][str(seed)] = budget_of(configs[seed, run.name], run_dir, row.unit, budget)
    for seed in seeds:
        skills[str(seed)] = {}
        for run in runs.values():
            run_dir = os.path.join(workdir, f"seed{seed}", run.name)
            for unit_id in spec.get("skills", ()):
                if unit_id not in skills[str(seed)] and plan.finished(run_dir, unit_id):
                    r = _stage_results(run_dir, unit_id)
                    skills[str(seed)][unit_id] = {"steps": r.get("steps"), "accuracy": r.get("accuracy")}
            for unit_id, key in plan.unit_keys(configs[seed, run.name]).items():
                entry = curves.setdefault(key, {"stage": unit_id, "runs": [], "seeds": {}})
                if run.name not in entry["runs"]:
                    entry["runs"].append(run.name)
                if str(seed) not in entry["seeds"]:  # the per-seed key differs: group by (stage, runs) below
                    records = _records(run_dir, unit_id)
                    entry["seeds"][str(seed)] = [(r["step"], r[TEST_CURVE]) for r in records if TEST_CURVE in r]
    return {"budgets": budgets, "skills": skills, "curves": _curves_over_seeds(curves)}


def _curves_over_seeds(by_key: dict) -> list[dict]:
    """Units are keyed per seed; the same unit of the same runs across seeds is one curve."""
    merged = {}
    for entry in by_key.values():
        label = (entry["stage"], tuple(entry["runs"]))
        merged.setdefault(label, {"stage": entry["stage"], "runs": list(entry["runs"]), "seeds": {}})
        merged[label]["seeds"].update(entry["seeds"])
    return list(merged.values())


def reproduce(module, base_parts, family: str, *, seeds=None, row_names=None, workdir: str, outdir: str,
              progress: bool = True) -> str:
    """Runs, evaluates and reports the family's table; returns the markdown table."""
    if not hasattr(module, "reproduction"):
        raise ValueError(f"{module.__file__} has no reproduction(): family {family!r} cannot be reproduced yet.")
    spec = module.reproduction(",".join(base_parts) or None)
    rows = plan.rows_of(spec)
    if row_names:
        unknown = set(row_names) - {r.name for r in rows}
        if unknown:
            raise ValueError(f"Unknown row(s) {sorted(unknown)}; {family} has {', '.join(r.name for r in rows)}.")
        rows = [r for r in rows if r.name in row_names]
    seeds = tuple(int(s) for s in (seeds or spec["seeds"]))
    runs, run_of = plan_runs(module, base_parts, rows)
    configs = train(module, base_parts, spec, runs, seeds, workdir, progress)
    selected, sweeps = {}, {}
    for row in rows:
        if row.sweep or row.budgets:
            selected[row.name], sweeps[row.name] = select(row, run_of, seeds, workdir)
    evaluations = evaluate(spec, rows, selected, run_of, runs, configs, seeds, workdir)
    results = {"family": family, "config": os.path.relpath(module.__file__), "variant": ",".join(base_parts), "seeds": list(seeds),
               "spec": json.loads(json.dumps(spec, default=str)),
               "rows": [dataclasses.asdict(r) for r in rows],
               "selected": {k: {"value": v[0], "budget": v[1]} for k, v in selected.items()}, "sweeps": sweeps,
               "evaluations": evaluations, **collect(spec, rows, selected, run_of, runs, configs, seeds, workdir)}
    return report.write(results, outdir)
