"""The bridge pipeline end to end through the launcher, resume after SIGKILL, user errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from launch_helpers import REPO, run_train, stable_records, train_cmd


def test_a_bridge_cut_to_one_stage_summarizes_without_c1_and_c2(tmp_path):
    """`--config.pipeline.stages=("student_sft",)` (the README's way to train a base once) runs
    neither the C1 nor the C2 stage: the summary leaves them out instead of failing."""
    result = run_train("configs/sparse_to_dense/toy.py:smoke", tmp_path, '--config.pipeline.stages=("student_sft",)')
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["stages"]) == ["student_sft"]
    assert "c1_teacher_accuracy_after_rl" not in summary and "c2_teacher_student_kl_before_opd" not in summary


def test_smoke_bridge_runs_end_to_end(tmp_path):
    result = run_train("configs/sparse_to_dense/toy.py:smoke", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["stages"]) == ["teacher_sft", "teacher_rl", "student_sft", "warmup", "opd", "student_rl"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # C1 is the teacher_rl stage's own held-out evaluation (as logged and as exported) ...
    teacher_eval = [r for r in records if r["stage"] == "teacher_rl" and "eval_accuracy" in r]
    exported = json.loads((tmp_path / "models" / "teacher_rl" / "results.json").read_text())
    assert len(teacher_eval) == 1
    assert summary["c1_teacher_accuracy_after_rl"] == teacher_eval[0]["eval_accuracy"] == exported["accuracy"]
    # ... and C2 the teacher-KL record of OPD's first step, measured before its first update.
    first_opd = next(r for r in records if r["stage"] == "opd" and "loss" in r)
    assert first_opd["step"] == 1 and summary["c2_teacher_student_kl_before_opd"] == first_opd["teacher_reverse_kl_sampled"]
    assert np.isfinite(first_opd["teacher_reverse_kl_sampled"])
    for stage in summary["stages"]:
        assert (tmp_path / "plots" / f"{stage}.png").exists()
        assert (tmp_path / "models" / stage / "model.safetensors").exists()
        assert (tmp_path / "checkpoints" / stage).is_dir()
    import transformers  # the exported student loads in transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "models" / "student_rl"))
    assert model.config.num_hidden_layers == 1
    rl = [r for r in records if r["stage"] == "teacher_rl" and "reward" in r]
    assert {"reward", "accuracy", "entropy", "response_length", "clip_frac_high", "grad_norm",
            "sample_tokens_per_s", "train_tokens_per_s", "step_time_s"} <= set(rl[0])
    _check_summary_table(result.stdout, summary, tmp_path)


def _check_summary_table(stdout, summary, workdir):
    """The launcher prints a table, one row per stage (with its model, accuracy, pass@k, KL to
    the base, entropy, length, wall time), where the plots are and results.json's path, not the JSON."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| stage "))
    assert [c.strip() for c in lines[header].strip("|").split("|")] == [
        "stage", "model", "steps", "accuracy", "pass@1", "KL to base", "entropy", "length", "wall time"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:] if line.startswith("|")]
    assert [r[0] for r in rows] == list(summary["stages"])
    models = {"teacher_sft": "teacher", "teacher_rl": "teacher"}
    for row in rows:
        unit = summary["stages"][row[0]]
        assert row[1] == models.get(row[0], "student") and int(row[2]) == unit["steps"] == 3
        printed = dict(zip(("accuracy", "pass@1", "kl_to_reference", "entropy", "response_length"), map(float, row[3:8])))
        for key, value in printed.items():  # KL to the base: to the model's own SFT stage
            assert abs(value - unit[key]) <= 5e-4, (row, key)
        assert row[8].endswith("s") and unit["wall_time_s"] >= unit["train_time_s"]
    assert summary["stages"]["teacher_sft"]["kl_to_reference"] == 0.0  # the base itself
    assert f"plots: {workdir / 'plots'}" in stdout and f"{workdir / 'results.json'}" in stdout
    assert not stdout.lstrip().startswith("{")  # no JSON dump


RESUME_CONFIG = '''
from configs.sparse_to_dense import toy


def get_config(arg=None):
    c = toy.get_config("smoke")
    with c.unlocked():
        c.pipeline.stages = ("teacher_sft", "opd")
        c.pipeline.c1_stage = ""
        c.stages.teacher_sft.steps = 4
        c.stages.opd.steps = 6
        c.checkpoint.every = 1
    return c
'''


def _final(workdir):
    return load_file(str(workdir / "models" / "opd" / "model.safetensors")), stable_records(workdir)


def test_resume_after_sigkill_matches_straight_run(tmp_path):
    config = tmp_path / "resume_config.py"
    config.write_text(RESUME_CONFIG)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train(str(config), straight).returncode == 0
    proc = subprocess.Popen(train_cmd(str(config), killed), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    cursor = killed / "cursor.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if cursor.exists():
            try:
                state = json.loads(cursor.read_text())
            except json.JSONDecodeError:
                state = {}
            if state.get("stage") == "opd" and state.get("step", 0) >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "opd" / "STAGE_DONE").exists()
    resumed = run_train(str(config), killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params_a, metrics_a = _final(straight)
    params_b, metrics_b = _final(killed)
    assert metrics_a == metrics_b
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name], err_msg=name)
    # launch.convert exports the latest opd checkpoint: the same weights as the stage's export
    out = tmp_path / "converted"
    converted = subprocess.run([sys.executable, "-m", "launch.convert", f"--workdir={killed}", "--stage=opd",
                                f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-2000:]
    exported = load_file(str(out / "model.safetensors"))
    for name in params_b:
        np.testing.assert_array_equal(exported[name], params_b[name], err_msg=name)


def test_unknown_config_key_names_it(tmp_path):
    result = run_train("configs/sparse_to_dense/toy.py:smoke", tmp_path, "--config.stages.opd.stepz=3")
    assert result.returncode == 2
    assert "stepz" in result.stderr and "Traceback" not in result.stderr


def test_unknown_variant_names_it(tmp_path):
    result = run_train("configs/sparse_to_dense/toy.py:smoke,no_bridge", tmp_path)
    assert result.returncode != 0
    assert "no_bridge" in result.stderr
