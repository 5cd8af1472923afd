"""launch.reproduce: which units are shared across a family's rows, that a shared unit is the
computation a row would have run alone, the table's statistics against NumPy, the tuned row's
selection against the validation curves, and resuming without new work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from bridge import metrics as metrics_lib, models, runtime
from bridge.reproduce import plan, report
from configs.sparse_to_dense import toy
from launch_helpers import REPO


def _keys(variant, **changes):
    cfg = toy.get_config(variant)
    cfg.unlock()
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    return plan.unit_keys(cfg)


def test_units_are_shared_exactly_when_their_inputs_are_equal():
    bridge, direct, raw, no_warmup = (_keys(v) for v in ("bridge", "direct_grpo", "raw_teacher", "no_warmup"))
    # the student's SFT reads no teacher: one computation in every row
    assert bridge["student_sft"] == direct["student_sft"] == raw["student_sft"] == no_warmup["student_sft"]
    assert bridge["teacher_sft"] == raw["teacher_sft"] == no_warmup["teacher_sft"]
    assert bridge["teacher_rl"] == no_warmup["teacher_rl"]
    assert bridge["warmup"] != raw["warmup"]  # distilled from another teacher
    assert bridge["opd"] != no_warmup["opd"]  # starts from another student
    assert bridge["student_rl"] != direct["student_rl"]  # another start (and step count)
    # a change upstream moves exactly the units downstream of it
    lr = _keys("bridge", stages__teacher_rl__optimizer__lr=5e-5)
    assert {u for u in bridge if lr[u] != bridge[u]} == {"teacher_rl", "warmup", "opd", "student_rl"}
    assert _keys("bridge", checkpoint__every=7, metrics__progress=False) == bridge  # bookkeeping only
    assert not set(_keys("bridge", seed=1).values()) & set(bridge.values())


def test_a_knob_added_later_keeps_every_key_while_off():
    """Runs keyed before a knob existed stay cached after it is added, off; on, it moves the
    units that use it and everything downstream."""
    bridge = _keys("bridge")
    assert _keys("bridge", stages__teacher_rl__new_knob=0, new_section={"flag": False, "name": ""}) == bridge
    on = _keys("bridge", stages__teacher_rl__new_knob=1)
    assert {u for u in bridge if on[u] != bridge[u]} == {"teacher_rl", "warmup", "opd", "student_rl"}


def test_dependencies_follow_the_models_each_stage_reads():
    graph = plan.unit_graph(toy.get_config("bridge"))
    assert graph["student_sft"][1] == frozenset()
    assert graph["warmup"][1] == {"teacher_sft", "teacher_rl", "student_sft"}
    assert graph["student_rl"][1] == {"teacher_sft", "teacher_rl", "student_sft", "warmup", "opd"}
    assert plan.unit_graph(toy.get_config("direct_grpo"))["student_rl"][1] == {"student_sft"}


def test_mean_std_and_readme_section():
    values = [0.25, 0.5, 0.875]
    mean, std = report.mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert report.mean_std([0.5]) == (0.5, 0.0)
    text = "a\n<!-- reproduce:fam -->\nold\n<!-- /reproduce:fam -->\nb\n"
    assert report.replace_section(text, "fam", "| new |\n") == "a\n<!-- reproduce:fam -->\n| new |\n<!-- /reproduce:fam -->\nb\n"
    with pytest.raises(ValueError, match="reproduce:other"):
        report.replace_section(text, "other", "x")


def _reproduce(workdir, *flags):
    cmd = [sys.executable, "-m", "launch.reproduce", "--config=configs/sparse_to_dense/toy.py:smoke",
           f"--workdir={workdir}/runs", f"--outdir={workdir}/out", "--noprogress", *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def _params(path):
    return [np.asarray(x) for x in __import__("jax").tree.leaves(nnx.state(models.load_hf(str(path)), nnx.Param))]


def test_reproduce_shares_units_selects_on_validation_and_resumes(tmp_path):
    proc = _reproduce(tmp_path, "--seeds=0,1", "--rows=student_base,direct_grpo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "runs"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    spec = toy.reproduction("smoke")
    lrs = spec["rows"]["direct_grpo"]["sweep"][1]
    for seed in (0, 1):
        # the student's SFT ran once per seed: every other run links it
        real = {os.path.realpath(runs / f"seed{seed}" / run / "stages" / "student_sft")
                for run in ["bridge", *(f"direct_grpo.lr={lr}" for lr in lrs)]}
        assert len(real) == 1
        assert (runs / f"seed{seed}" / f"direct_grpo.lr={lrs[1]}" / "stages" / "student_sft").is_symlink()
    # a run with linked units computes what it computes alone
    from bridge import reproduce

    run = reproduce.Run(f"direct_grpo.lr={lrs[1]}", "direct_grpo", "student_rl", "stages.student_rl.optimizer.lr",
                        lrs[1], "student_rl", spec["rows"]["direct_grpo"]["budgets"])
    alone = tmp_path / "alone"
    runtime.run_pipeline(reproduce.run_config(toy, ["smoke"], spec, run, 1, False), str(alone))
    shared = runs / "seed1" / run.name
    for a, b in zip(_params(alone / "models" / "student_rl"), _params(shared / "models" / "student_rl")):
        np.testing.assert_array_equal(a, b)
    # selection: the (lr, budget) with the best mean validation curve accuracy, read here from the records
    scores = {}
    for lr in lrs:
        for budget in spec["rows"]["direct_grpo"]["budgets"]:
            per_seed = []
            for seed in (0, 1):
                workdir, unit = plan.real_unit(str(runs / f"seed{seed}" / f"direct_grpo.lr={lr}"), "student_rl")
                record = next(r for r in metrics_lib.read_metrics(workdir)[unit] if r["step"] == budget)
                per_seed.append(record["held_out_validation_accuracy"])
            scores[lr, budget] = np.mean(per_seed)
    best = max(scores.values())
    first = next(k for k in sorted(scores, key=lambda k: (k[1], lrs.index(k[0]))) if scores[k] == best)
    assert (results["selected"]["direct_grpo"]["value"], results["selected"]["direct_grpo"]["budget"]) == first
    # the table's cells are NumPy's mean and sample std over the per-seed evaluations
    table = (tmp_path / "out" / "table.md").read_text()
    for row in ("student_base", "direct_grpo"):
        values = [results["evaluations"][row][s]["test"]["greedy"] for s in ("0", "1")]
        assert f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" in table
        assert set(results["evaluations"][row]) == {"0", "1"}
    assert results["budgets"]["direct_grpo"]["0"]["rollouts"] == (
        results["selected"]["direct_grpo"]["budget"] * 4 * 4)  # smoke: 4 prompts x 4 samples a step
    for name in ("bars.png", "accuracy_vs_kl.png", "curves.png"):
        assert (tmp_path / "out" / "plots" / name).stat().st_size > 0
    # the same command again: nothing trains, the same table
    lines = {p: p.read_text().count("\n") for p in runs.rglob("metrics.jsonl")}
    again = _reproduce(tmp_path, "--seeds=0,1", "--rows=student_base,direct_grpo")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_text().count("\n") for p in runs.rglob("metrics.jsonl")} == lines
    assert (tmp_path / "out" / "table.md").read_text() == table


def test_a_family_without_a_reproduction_or_an_unknown_row_is_refused(tmp_path):
    proc = _reproduce(tmp_path, "--rows=bridge,nope")
    assert proc.returncode == 2 and "Unknown row(s) ['nope']" in proc.stderr, proc.stderr[-2000:]
    cmd = [sys.executable, "-m", "launch.reproduce", "--config=configs/self_distill/proxy.py:smoke",
           f"--workdir={tmp_path}/w", f"--outdir={tmp_path}/o"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "has no reproduction()" in proc.stderr and "self_distill" in proc.stderr



@pytest.mark.parametrize("module", ["configs.sparse_to_dense.toy", "configs.erpd.toy", "configs.self_distill.toy"])
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_family_reproduction_resolves_its_rows(module, arg):
    """Each row names a unit of its variant's pipeline; tuned rows' budgets are on the curve."""
    from bridge import reproduce

    module = __import__(module, fromlist=["reproduction"])
    spec = module.reproduction(arg)
    rows = plan.rows_of(spec)
    runs, run_of = reproduce.plan_runs(module, [arg] if arg else [], rows)
    assert {name for name, _ in run_of} == set(spec["rows"])
    for run in runs.values():
        cfg = reproduce.run_config(module, [arg] if arg else [], spec, run, 0, False)
        assert run.last_unit in plan.unit_keys(cfg)
    for row in rows:
        assert all(b % spec["curve_every"] == 0 for b in row.budgets)


def test_stage_kinds_count_their_sampled_completions():
    from bridge import stages

    c = toy.get_config()
    counts = {name: stages.kind(c.stages[name].kind).rollouts(c, c.stages[name], 10) for name in c.pipeline.stages}
    # rl / opd: 10 steps x 32 prompts x 8; warmup: its pool, 8 teacher samples of each of the 512 train prompts
    assert counts == {"teacher_sft": 0, "teacher_rl": 2560, "student_sft": 0, "warmup": 4096, "opd": 2560,
                      "student_rl": 2560}
    e = __import__("configs.erpd.toy", fromlist=["get_config"]).get_config()
    assert stages.kind("erpd_teacher").rollouts(e, e.stages.erpd_teacher, 48) == 256 * 8  # one fixed batch
    assert stages.kind("erpd_distill").rollouts(e, e.stages.erpd_distill, 8) == 0


@pytest.mark.parametrize("family", ["sparse_to_dense", "self_distill", "erpd"])
def test_the_readme_table_is_the_committed_results_table(family):
    """The README's table of each reproduced family is `--readme`'s output from results/<family>,
    with 3+ seeds and every row of the family's `reproduction()`."""
    import importlib

    readme = (REPO / "README.md").read_text()
    results = json.loads((REPO / "results" / family / "results.json").read_text())
    table = report.markdown(results)
    assert (REPO / "results" / family / "table.md").read_text() == table
    assert report.replace_section(readme, family, table) == readme
    rows = importlib.import_module(f"configs.{family}.toy").reproduction()["rows"]
    assert len(results["seeds"]) >= 3 and set(results["evaluations"]) == set(rows)
