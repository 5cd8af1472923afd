"""Operating a run as a user does, through `python -m launch.train` in a subprocess: one run per
workdir, nothing written before the inputs validate, one line (naming the file and line or
tensor) and a non-zero exit for every failure, Ctrl-C, resume after a kill during export,
skipped non-finite updates in the results, and resumes with changed settings. Each failing
run also shows that nothing already saved changed."""

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from bridge import losses, models, scoring
from bridge.stages import rl

from launch_helpers import REPO, stable_records

CONFIG = '''
from configs import common
from configs.sparse_to_dense import toy


def get_config(arg=None):
    c = toy.get_config("smoke")
    with c.unlocked():
        c.pipeline.name = "stages"
        pipelines = {"warmup": ("warmup",), "scaled": ("scaled",), "block": ("block:b",)}
        c.pipeline.stages = pipelines.get(arg, ("student_sft",))
        c.pipeline.c1_stage = c.pipeline.c2_stage = ""
        c.pipeline.blocks = common.cd(b=common.block(("student_sft",), 1))
        c.stages.student_sft.steps = 2
        c.stages.scaled = common.rl_stage("student", 1e-2, 4, kind="test_operations:SCALED", prompts_per_step=4,
                                          scale=1e30, sampling=common.sampling(4, max_new_tokens=8))
        c.checkpoint.every = 1
        c.metrics.plots = False
        if arg in ("gsm8k", "math"):
            c.task = common.cd(name=arg, options=common.cd(chat=False, train_path="", test_path=""))
    return c
'''


def _scaled_likelihood(scfg, frozen_graphdefs):
    """-scale^2 * mean log pi of the rollouts: scale 1e30 overflows float32, a non-finite update."""
    def loss_fn(model, batch, frozen):
        logp = scoring.completion_logprobs(model, batch)
        return -losses.masked_mean(logp, batch["mask"] * batch["row_weight"][:, None]) * scfg.scale * scfg.scale, {}
    return loss_fn


SCALED = dataclasses.replace(rl.KIND, make_loss=_scaled_likelihood)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "ops_config.py"
    path.write_text(CONFIG)
    return str(path)


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}


def _cmd(config, workdir, *args):
    return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}", *args]


def _run(config, workdir, *args):
    return subprocess.run(_cmd(config, workdir, *args), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _start(config, workdir, *args):
    return subprocess.Popen(_cmd(config, workdir, *args), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _failed(proc, *named, code=2) -> str:
    """The one stderr line of a run that exited with `code`; it names every string in `named`."""
    assert proc.returncode == code, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert line.startswith("error: ") and all(n in line for n in named), line
    return line


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def _snapshot(workdir) -> dict:
    """Path -> content hash of every file under `workdir`."""
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(workdir).rglob("*")) if p.is_file()}


def _records(workdir):
    return stable_records(workdir)


def _wait_for_step(proc, workdir, step):
    cursor = Path(workdir) / "cursor.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if json.loads(cursor.read_text())["step"] >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    raise AssertionError("the run did not reach the step")


# 1. one run per workdir


def test_second_run_on_a_workdir_stops_naming_the_first_and_ctrl_c_says_where_it_resumes(tmp_path, config):
    workdir = tmp_path / "run"
    first = _start(config, workdir, "--config.stages.student_sft.steps=2000")
    _wait_for_step(first, workdir, 1)
    config_json = (workdir / "config.json").read_bytes()
    start = time.time()
    second = _run(config, workdir, "--config.stages.student_sft.steps=2000")
    _failed(second, "in use by another run", f"host {socket.gethostname()}", f"pid {first.pid}")
    assert time.time() - start < 60 and (workdir / "config.json").read_bytes() == config_json
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-3000:]
    cursor = json.loads((workdir / "cursor.json").read_text())
    line = _one_line(stderr)
    assert f"resumes stage student_sft from its checkpoint at step {cursor['step']}" in line, line
    assert not (workdir / "LOCK").exists()
    steps = [(r["stage"], r["step"]) for r in _records(workdir) if "loss" in r]
    assert len(steps) == len(set(steps))


def test_ctrl_c_then_resume_finishes_the_run(tmp_path, config):
    workdir = tmp_path / "run"
    proc = _start(config, workdir, "--config.stages.student_sft.steps=12")
    _wait_for_step(proc, workdir, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "resumes stage student_sft" in _one_line(stderr), stderr[-3000:]
    _ok(_run(config, workdir, "--config.stages.student_sft.steps=12"))
    assert [r["step"] for r in _records(workdir) if "loss" in r] == list(range(1, 13))


def test_a_stale_lock_is_taken_over_and_reported(tmp_path, config):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "since": "then"}))
    proc = _run(config, workdir)
    _ok(proc)
    line = _one_line(proc.stderr)
    assert line.startswith("warning: taking over the lock") and f"pid {gone.pid}" in line, line
    assert not (workdir / "LOCK").exists() and (workdir / "models" / "student_sft" / "STAGE_DONE").exists()


# 2. and 3. nothing written before the inputs validate; one line for every failure


def test_a_run_refused_at_startup_writes_nothing_and_the_corrected_one_runs(tmp_path, config):
    workdir = tmp_path / "run"
    _failed(_run(config, workdir, "--config.task.name=arithmetc"), "Unknown task 'arithmetc'")
    assert not workdir.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    _failed(_run(f"{config}:gsm8k", workdir, f"--config.task.options.train_path={bad}"), f"{bad}:2")
    assert not workdir.exists()
    _ok(_run(config, workdir))
    saved = _snapshot(workdir)
    _failed(_run(f"{config}:gsm8k", workdir, f"--config.task.options.train_path={bad}"), f"{bad}:2")
    assert _snapshot(workdir) == saved  # a refused resume changes nothing


@pytest.mark.parametrize("case", ["file", "under_a_file"])
def test_a_workdir_that_is_a_file_is_one_line(tmp_path, config, case):
    (tmp_path / "file").write_text("not a directory")
    workdir = tmp_path / "file" if case == "file" else tmp_path / "file" / "run"
    _failed(_run(config, workdir), f"Cannot use {workdir} as the workdir: ")
    assert (tmp_path / "file").read_text() == "not a directory"


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, config):
    """Not writable: a read-only folder for a normal user; /sys refuses even root."""
    if os.geteuid() != 0:
        parent = tmp_path / "read_only"
        parent.mkdir()
        parent.chmod(0o500)
    elif os.path.isdir("/sys"):
        parent = Path("/sys")
    else:
        pytest.skip("running as root without /sys: no folder refuses writes")
    workdir = parent / f"run_{os.getpid()}"
    _failed(_run(config, workdir), f"Cannot use {workdir} as the workdir: ")
    assert not workdir.exists()


# 4. bad data files

GOOD = [{"question": f"What is {k} + 1?", "answer": f"{k} + 1 = <<{k}+1={k + 1}>>{k + 1}\n#### {k + 1}"}
        for k in range(4)]


def _lines(*records):
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


BAD_DATA = {  # case -> (file content, what the message names after the file name)
    "malformed": (_lines(*GOOD[:2]) + b'{"question": "q", "answer": "#### 1"\n', ":3: not valid JSON"),
    "empty": (b"", ": no records for split"),
    "no_answer": (_lines(GOOD[0], {"question": "q"}), ':2: a GSM8K record needs "question" and "answer"'),
    "list": (_lines(GOOD[0]) + b'["q", "#### 1"]\n', ":2: expected a JSON object, got a list"),
    "utf8": (_lines(GOOD[0]) + b'{"question": "\xff\xfe", "answer": "#### 1"}\n', ":2: not valid UTF-8"),
    "null_answer": (_lines(GOOD[0], {"question": "q", "answer": None}), ":2: a GSM8K record needs"),
    "no_hashes": (_lines(GOOD[0], {"question": "q", "answer": "it is 5"}),
                  ':2: the GSM8K answer does not end in "####'),
}


@pytest.mark.parametrize("case, split", [(case, "train") for case in sorted(BAD_DATA)]
                         + [("malformed", "test"), ("no_hashes", "test")])
def test_a_bad_data_file_is_one_line_naming_file_and_line_at_startup(tmp_path, config, case, split):
    content, named = BAD_DATA[case]
    good, bad = tmp_path / "good.jsonl", tmp_path / f"bad_{split}.jsonl"
    good.write_bytes(_lines(*GOOD))
    bad.write_bytes(content)
    paths = {"train": good, "test": good, split: bad}
    proc = _run(f"{config}:gsm8k", tmp_path / "run", f"--config.task.options.train_path={paths['train']}",
                f"--config.task.options.test_path={paths['test']}")
    _failed(proc, f"{bad}{named}")
    assert not (tmp_path / "run").exists()  # before the first stage trained: nothing written


def test_a_math_file_without_solutions_for_gold_sft_is_one_line_at_startup(tmp_path, config):
    """Answers are enough for RL and evaluation, but a gold SFT stage trains on the solutions."""
    records = [{"problem": f"What is {k} + 1?", "answer": str(k + 1)} for k in range(4)]
    for record in records[:2]:
        record["solution"] = f"{record['problem'][8:-1]} = \\boxed{{{record['answer']}}}"
    data = tmp_path / "math.jsonl"
    data.write_bytes(_lines(*records))
    proc = _run(f"{config}:math", tmp_path / "run", f"--config.task.options.train_path={data}",
                f"--config.task.options.test_path={data}")
    _failed(proc, f'{data}:3: the record has no "solution"', "stage 'student_sft'", "source='gold'")
    assert not (tmp_path / "run").exists()


# 5. bad weight folders


def _truncate(name, size):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:size(folder / name)])


def _drop_heads(folder):
    hf = json.loads((folder / "config.json").read_text())
    del hf["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(hf))


def _nan_weight(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


UNREADABLE = "/model.safetensors: not a readable safetensors file"
BAD_WEIGHTS = {  # case -> (damage, what the message names after the folder)
    "truncated": (_truncate("model.safetensors", lambda p: p.stat().st_size // 2), UNREADABLE),
    "empty": (_truncate("model.safetensors", lambda p: 0), UNREADABLE),
    "header": (_truncate("model.safetensors", lambda p: 20), UNREADABLE),
    "config_key": (_drop_heads, "/config.json: missing required key 'num_attention_heads'"),
    "config_truncated": (_truncate("config.json", lambda p: p.stat().st_size // 2), "/config.json:"),
    "nan": (_nan_weight, " has tensors of the wrong shape or with NaN/inf values: "
                         "['model.layers.1.mlp.up_proj.weight: NaN/inf values']"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_a_bad_weight_folder_is_one_line_naming_file_and_key_or_tensor(tmp_path, config, case):
    damage, named = BAD_WEIGHTS[case]
    folder = tmp_path / "teacher"
    tokenizer = models.char_tokenizer("0123456789+=")
    arch = models.ModelConfig(family="qwen3", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, qk_norm=True,
                              tie_word_embeddings=True)
    models.save_hf(models.Decoder(arch, rngs=nnx.Rngs(0)), str(folder), tokenizer=tokenizer)
    damage(folder)
    proc = _run(f"{config}:warmup", tmp_path / "run", f"--config.models.teacher.hf_dir={folder}")
    _failed(proc, f"{folder}{named}")
    if case != "nan":  # NaN weights are found when the weights load, the rest at startup
        assert not (tmp_path / "run").exists()


# 6. a kill during a stage's export


def test_a_resume_after_a_kill_during_export_records_the_evaluation_once(tmp_path, config):
    workdir = tmp_path / "run"
    _ok(_run(config, workdir))
    straight = _records(workdir)
    assert sum("eval_accuracy" in r for r in straight) == 1
    # what a kill while the weights are written leaves: the evaluation recorded, the unit not
    # done, the model folder holding only config.json
    (workdir / "stages" / "student_sft" / "DONE.json").unlink()
    for path in (workdir / "models" / "student_sft").iterdir():
        if path.name != "config.json":
            path.unlink()
    _ok(_run(config, workdir))
    assert _records(workdir) == straight
    assert (workdir / "models" / "student_sft" / "STAGE_DONE").exists()


def test_a_real_sigkill_during_the_evaluation_and_export_resumes_to_the_same_records(tmp_path, config):
    """SIGKILL once the stage's last step is saved and before it is done (its held-out
    evaluation on 2,000 prompts, then the weights): the resumed run equals a straight one."""
    big_eval = ("--config.eval.num_prompts=2000", "--config.eval.batch_size=250",
                "--config.task.options.num_test=2000")
    straight = tmp_path / "straight"
    _ok(_run(config, straight, *big_eval))
    workdir = tmp_path / "killed"
    proc = _start(config, workdir, *big_eval)
    _wait_for_step(proc, workdir, 2)  # the cursor moves after the last checkpoint is saved
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (workdir / "stages" / "student_sft" / "DONE.json").exists(), "killed too late"
    _ok(_run(config, workdir, *big_eval))
    records = _records(workdir)
    assert records == _records(straight) and sum("eval_accuracy" in r for r in records) == 1
    a, b = (load_file(str(w / "models" / "student_sft" / "model.safetensors")) for w in (straight, workdir))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# 7. and 9. skipped non-finite updates in the results; resumes with changed settings


def test_a_nonfinite_stop_resumes_with_an_allowed_change_and_counts_the_skipped_updates(tmp_path, config):
    workdir, scaled = tmp_path / "run", f"{config}:scaled"
    _failed(_run(scaled, workdir), "3 consecutive non-finite", "--allow_changed=stages.scaled.optimizer.lr")
    saved = _snapshot(workdir)
    _failed(_run(scaled, workdir, "--config.stages.scaled.scale=1.0"), "changed: stages.scaled.scale",
            "--allow_changed=stages.scaled.scale")
    assert _snapshot(workdir) == saved
    proc = _run(scaled, workdir, "--config.stages.scaled.scale=1.0", "--allow_changed=stages.scaled.scale")
    _ok(proc)
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert [(h["changed"], h["from_unit"]) for h in history] == [({"stages.scaled.scale": [1e30, 1.0]}, "scaled")]
    steps = [(r["step"], r["update_skipped"]) for r in _records(workdir) if "loss" in r]
    assert steps == [(1, 1.0), (2, 1.0), (3, 0.0), (4, 0.0)]  # resumed from the last good checkpoint (2)
    results = json.loads((workdir / "results.json").read_text())
    assert results["stages"]["scaled"]["nonfinite_skipped_updates"] == 2
    assert "non-finite updates skipped: scaled 2" in proc.stdout  # the printed summary


def test_changed_eval_settings_are_refused_then_allowed_and_recorded_per_unit(tmp_path, config):
    workdir, block = tmp_path / "run", f"{config}:block"
    _ok(_run(block, workdir))
    saved = _snapshot(workdir)
    more = ("--config.pipeline.blocks.b.repeat=2", "--config.eval.num_prompts=4", "--config.eval.temperature=1.0")
    _failed(_run(block, workdir, *more), "changed: eval.num_prompts, eval.temperature", "student_sft@1",
            "--allow_changed=eval.num_prompts,eval.temperature")
    assert _snapshot(workdir) == saved
    _ok(_run(block, workdir, *more, "--allow_changed=eval"))
    stages = json.loads((workdir / "results.json").read_text())["stages"]
    assert [(stages[u]["eval"]["num_prompts"], stages[u]["eval"]["temperature"])
            for u in ("student_sft@1", "student_sft@2")] == [(16, 0.0), (4, 1.0)]
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert [(h["changed"], h["from_unit"]) for h in history] == [
        ({"eval.num_prompts": [16, 4], "eval.temperature": [0.0, 1.0]}, "student_sft@2")]


# 8. model references checked at startup


@pytest.mark.parametrize("variant, reference, named", [
    ("", "studnt", "is neither a model slot (config.models defines ['student', 'teacher'])"),
    ("", "stage:student_sf", "the pipeline has no unit 'student_sf'"),
    ("", "hf:{tmp}/nowhere", "{tmp}/nowhere"),
    ("block", "stage:student_sft@2", "unit 'student_sft@1' is evaluated before 'student_sft@2' runs"),
])
def test_a_bad_kl_reference_is_one_line_at_startup(tmp_path, config, variant, reference, named):
    reference, named = reference.format(tmp=tmp_path), named.format(tmp=tmp_path)
    proc = _run(f"{config}:{variant}" if variant else config, tmp_path / "run",
                f"--config.eval.kl_reference={reference}", "--config.pipeline.blocks.b.repeat=2")
    _failed(proc, f"eval.kl_reference={reference!r}", named)
    assert not (tmp_path / "run").exists()  # before the first stage trained: nothing written
