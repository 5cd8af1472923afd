"""What `launch.reproduce` runs: the family's rows as runs (one workdir per seed and variant),
and which units of those runs are the same computation, so each runs once per seed.

A unit's key is a hash of everything its outputs are a function of:
  - the experiment config without its pipeline, stages, metrics, checkpoint and system settings (the
    task, tokenizer, model slots, evaluation settings, seed, mesh, dtypes);
  - the unit's stage name, iteration, export flag and stage config (the stage name and
    iteration seed its randomness, `Context.rng`);
  - the key of the unit that last trained the same model slot before it ("init" if none);
  - the key of every model it reads: each model slot its kind declares (`StageKind.models`,
    and the sampling's proxy models; the last unit on that slot), and each "stage:X" or
    "artifact:X/..." anywhere in its stage config (unit X; "absent" when X has not run before
    it, which is also what the runtime sees).
Settings that are off (False, 0, "", None) are left out of the hash: a knob added to the code
later, off by default, changes no key, so cached units and evaluations stay valid.
Two units with equal keys in two runs compute the same thing, so the second run links the
first's finished unit (its stage record, exported model, artifacts and checkpoints) into its
workdir and the runtime skips it: the teacher's SFT and RL and the student's SFT run once per seed
whatever the number of rows that start from them. Unnecessary dependencies only lose sharing;
a key never misses one the runtime can see (model folders given by `hf_dir` are keyed by path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from bridge import runtime, stages

# what a run's workdir holds per unit: stages/<id>/DONE.json, models/<id>, artifacts/<id>, checkpoints/<id>
UNIT_DIRS = ("stages", "models", "artifacts", "checkpoints")
_NOT_KEYED = ("pipeline", "stages", "metrics", "checkpoint", "system")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a family's table: the model of `unit` after the pipeline of config `variant`.
    `sweep` = (config key, values) makes one run per value (a tuned baseline); with `budgets`
    the unit trains max(budgets) steps, exports a snapshot at each other budget, and the row
    reports the (value, budget) with the best mean validation accuracy over seeds."""

    name: str
    label: str
    variant: str
    unit: str
    sweep: tuple = ()
    budgets: tuple = ()


def rows_of(spec: dict) -> list[Row]:
    return [Row(name=name, label=r.get("label", name), variant=r["variant"], unit=r["unit"],
                sweep=tuple(r.get("sweep", ())), budgets=tuple(r.get("budgets", ())))
            for name, r in spec["rows"].items()]


def _strings(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _strings(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _strings(value)
    elif isinstance(tree, str):
        yield tree


def _without_off(tree):
    """`tree` without its off settings (`runtime.is_off`: False, 0, "", None, empty), so a knob
    added to the code later, off by default, leaves every key as it was."""
    if not isinstance(tree, dict):
        return tree
    return {k: _without_off(v) for k, v in tree.items() if not runtime.is_off(v)}


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(_without_off(payload), sort_keys=True, default=str).encode()).hexdigest()[:16]


def unit_graph(cfg) -> dict[str, tuple[str, frozenset]]:
    """unit id -> (key, the ids of every unit it depends on, transitively) for every unit of
    `cfg`'s pipeline (the key as in the module docstring)."""
    config = json.loads(cfg.to_json_best_effort(sort_keys=True))
    common = _digest({k: v for k, v in config.items() if k not in _NOT_KEYED})
    slots = set(cfg.models)
    last, graph = {}, {}  # slot -> id of the unit that last trained it; id -> (key, deps)
    for unit, scfg, export in runtime.pipeline_units(cfg):
        stage_config = json.loads(scfg.to_json_best_effort(sort_keys=True))
        stage_config.pop("per_iteration", None)  # resolved into this iteration's values (runtime.for_iteration)
        deps, parents = set(), {last[scfg.model]} if scfg.model in last else set()
        named = {*stages.kind(scfg.kind).models(scfg).values(), *_strings(stage_config.get("sampling", {}).get("proxy", {}))}
        for ref in [*_strings(stage_config), str(cfg.eval.get("kl_reference", "")), *named]:
            if ref in slots and ref != scfg.model and ref in named:
                deps.add(f"slot:{ref}:{graph[last[ref]][0] if ref in last else 'init'}")
                parents |= {last[ref]} if ref in last else set()
            for prefix in ("stage:", "artifact:"):
                if ref.startswith(prefix):
                    target = ref[len(prefix):].partition("/")[0]
                    if unit.block and "@" not in target and target in unit.block_stages:
                        target = f"{target}@{unit.iteration}"
                    deps.add(f"unit:{target}:{graph[target][0] if target in graph else 'absent'}")
                    parents |= {target} if target in graph else set()
        own = graph[last[scfg.model]][0] if scfg.model in last else "init"
        key = _digest({"common": common, "stage": unit.stage, "iteration": unit.iteration, "export": export,
                       "config": stage_config, "own": own, "deps": sorted(deps)})
        graph[unit.id] = (key, frozenset(parents).union(*(graph[p][1] for p in parents)))
        last[scfg.model] = unit.id
    return graph


def unit_keys(cfg) -> dict[str, str]:
    """unit id -> key for every unit of `cfg`'s pipeline."""
    return {unit_id: key for unit_id, (key, _) in unit_graph(cfg).items()}


def finished(workdir: str, unit_id: str) -> bool:
    return os.path.exists(os.path.join(workdir, "stages", unit_id, "DONE.json"))


def link_shared(workdir: str, keys: dict[str, str], done: dict[str, tuple[str, str]]) -> list[str]:
    """Links into `workdir` every unit of `keys` that is not finished there and whose key is in
    `done` (key -> (workdir, unit id) of a finished unit); returns the linked unit ids. Links are
    relative, so a results tree can move."""
    linked = []
    for unit_id, key in keys.items():
        if finished(workdir, unit_id) or key not in done:
            continue
        source, source_id = done[key]
        for sub in UNIT_DIRS:
            src = os.path.realpath(os.path.join(source, sub, source_id))
            dst = os.path.join(workdir, sub, unit_id)
            if not os.path.exists(src):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.lexists(dst):  # a partial run of the same unit here: the finished one wins
                import shutil

                shutil.rmtree(dst) if os.path.isdir(dst) and not os.path.islink(dst) else os.remove(dst)
            os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)
        linked.append(unit_id)
    return linked


def real_unit(workdir: str, unit_id: str) -> tuple[str, str]:
    """(workdir, unit id) where a (possibly linked) unit really ran: its metrics are there."""
    path = os.path.realpath(os.path.join(workdir, "stages", unit_id))
    return os.path.dirname(os.path.dirname(path)), os.path.basename(path)
