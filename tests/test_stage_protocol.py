"""The stage protocol: a stage kind defined here, outside the package, runs in a pipeline,
compiles through launch.fit, and repeats in a block that resumes exactly after a SIGKILL;
artifacts and the one source of randomness."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from bridge import losses, pipelines, runtime, scoring
from bridge.stages import rl
from configs import common
from stage_helpers import smoke_config, tiny_model

REPO = Path(__file__).resolve().parents[1]
VOLATILE_SUFFIXES = ("_s", "_per_s", "_gib")


def _own_likelihood(scfg, frozen_graphdefs):
    """A trivial loss over the rl batch spec: -scale * mean_t log pi(y_t) of the rollouts."""
    def loss_fn(model, batch, frozen):
        logp = scoring.completion_logprobs(model, batch)
        loss = -scfg.scale * losses.masked_mean(logp, batch["mask"] * batch["row_weight"][:, None])
        return loss, {"scale": scfg.scale + 0.0 * loss}
    return loss_fn


TRIVIAL = dataclasses.replace(rl.KIND, make_loss=_own_likelihood)

CONFIG = '''
from configs import common
from configs.sparse_to_dense import toy


def get_config(arg=None):
    c = toy.get_config("smoke")
    with c.unlocked():
        c.pipeline.name = "stages"
        c.pipeline.stages = ("student_sft", "block:loop")
        c.pipeline.blocks = common.cd(loop=common.block(("trivial",), 3))
        c.stages.trivial = common.rl_stage(
            "student", 1e-2, 3, kind="test_stage_protocol:TRIVIAL", prompts_per_step=4, scale=1.0,
            sampling=common.sampling(4, max_new_tokens=8), per_iteration=common.cd(scale=(1.0, 2.0, 0.5)))
        c.checkpoint.every = 1
        c.metrics.plots = False
    return c
'''


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "trivial_config.py"
    path.write_text(CONFIG)
    return str(path)


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}


def _train(config, workdir, *overrides, **kw):
    return subprocess.Popen([sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
                             *overrides], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _records(workdir):
    records = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(VOLATILE_SUFFIXES)} for r in records]


def test_new_kind_runs_in_a_pipeline_with_per_iteration_settings(tmp_path, config_file):
    """In process, with the kind named by import path; each iteration sees its own `scale`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trivial_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    with cfg.unlocked():
        cfg.stages.trivial.steps = 1
        cfg.pipeline.blocks.loop.repeat = 2
    summary = pipelines.run(cfg, str(tmp_path))
    assert list(summary["stages"]) == ["student_sft", "trivial@1", "trivial@2"]
    scales = {r["stage"]: r["scale"] for r in _records(tmp_path) if "scale" in r}
    assert scales == {"trivial@1": 1.0, "trivial@2": 2.0}
    for unit in ("trivial@1", "trivial@2"):  # the last stage of a block exports each iteration
        assert (tmp_path / "models" / unit / "model.safetensors").exists()


def test_new_kind_compiles_through_launch_fit(config_file):
    proc = subprocess.run([sys.executable, "-m", "launch.fit", f"--config={config_file}", "--devices=4",
                           "--prompt_len=16"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| trivial |")]
    assert [r.split("|")[2].strip() for r in rows] == ["update", "sample prefill", "sample decode", "score"], proc.stdout


def test_repeated_block_resumes_after_sigkill_and_grows(tmp_path, config_file):
    """3 iterations killed inside iteration 2 then resumed equal a straight run (weights and
    metrics); raising `repeat` to 4 on the finished workdir runs iteration 4 only."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _finish(_train(config_file, straight))
    proc = _train(config_file, killed, start_new_session=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and '"stage": "trivial@2", "step": 1' in metrics.read_text():
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "trivial@3").exists()
    _finish(_train(config_file, killed))
    for run in (straight, killed):
        assert (run / "models" / "trivial@3" / "model.safetensors").exists()
    a, b = (load_file(str(run / "models" / "trivial@3" / "model.safetensors")) for run in (straight, killed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert _records(straight) == _records(killed)
    assert all(r["grad_norm"] > 0 for r in _records(straight) if r["stage"].startswith("trivial") and "loss" in r)

    before = _records(straight)
    _finish(_train(config_file, straight, "--config.pipeline.blocks.loop.repeat=4"))
    after = _records(straight)
    assert after[:len(before)] == before
    assert {r["stage"] for r in after[len(before):]} == {"trivial@4"}
    assert json.loads((straight / "results.json").read_text())["stages"].keys() >= {"trivial@4"}


def test_artifacts_round_trip_and_name_their_stage(tmp_path):
    cfg = smoke_config(["student_sft"])
    ctx = runtime.make_context(cfg, str(tmp_path))
    unit = runtime.Unit("erpd_teacher", 2, "round", ("erpd_teacher", "erpd_student"))
    tree = {"logp": np.arange(6, dtype=np.float32).reshape(2, 3), "nested": {"ids": np.array([1, 2], np.int32)}}
    ctx.publish(unit, "batch", tree)
    model = tiny_model(vocab=len(ctx.tokenizer))
    ctx.publish(unit, "snapshot", model)
    got = ctx.artifact("artifact:erpd_teacher@2/batch")
    np.testing.assert_array_equal(got["logp"], tree["logp"])
    np.testing.assert_array_equal(got["nested"]["ids"], tree["nested"]["ids"])
    ctx.current = runtime.Unit("erpd_student", 2, "round", ("erpd_teacher", "erpd_student"))
    np.testing.assert_array_equal(ctx.artifact("artifact:erpd_teacher/batch")["logp"], tree["logp"])  # same round
    loaded = ctx.model("artifact:erpd_teacher/snapshot")
    ids = np.array([[1, 2, 3]])
    np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), atol=1e-6)
    ctx.current = runtime.Unit("erpd_student", 3, "round", ("erpd_teacher", "erpd_student"))
    with pytest.raises(ValueError, match="stage 'erpd_teacher@3' must run before this stage and publish 'batch'"):
        ctx.artifact("artifact:erpd_teacher/batch")


def test_every_random_choice_has_its_own_key(tmp_path):
    ctx = runtime.make_context(smoke_config(["student_sft"]), str(tmp_path))
    units = [runtime.Unit("a"), runtime.Unit("a", 1, "b", ("a",)), runtime.Unit("a", 2, "b", ("a",)), runtime.Unit("c")]
    seeds = {(u, step, purpose): ctx.seed(u, step, purpose)
             for u in units for step in (0, 1) for purpose in ("sample", "prompts")}
    assert len(set(seeds.values())) == len(seeds)  # iterations, steps and purposes never share a draw
    assert ctx.seed(units[2], 1, "sample") == seeds[(units[2], 1, "sample")]
    key = ctx.rng(units[1], 0, "sample")
    assert jax.random.key_data(key).shape == jax.random.key_data(jax.random.key(0)).shape


def test_rollout_concat_pads_and_rows_select():
    """Rollouts of different widths join with prompts padded on the left and completions on
    the right; `rows` picks rows in the given order, texts and examples with them."""
    from bridge.stages.common import Rollout

    def make(rows, p, n, offset):
        return Rollout(prompt_tokens=np.full((rows, p), 7, np.int32), prompt_mask=np.ones((rows, p), bool),
                       tokens=np.full((rows, n), 3, np.int32), mask=np.ones((rows, n), bool),
                       sample_logp=np.full((rows, n), -1.0, np.float32), lengths=np.full(rows, n),
                       truncated=np.zeros(rows, bool), rewards=np.arange(rows, dtype=np.float32) + offset,
                       format_ok=np.ones(rows, np.float32), texts=tuple(f"t{offset + i}" for i in range(rows)),
                       examples=tuple(range(offset, offset + rows)), sample_tokens_per_s=10.0)

    both = Rollout.concat([make(2, 3, 4, 0), make(1, 5, 2, 10)])
    assert both.prompt_tokens.shape == (3, 5) and both.tokens.shape == (3, 4)
    np.testing.assert_array_equal(both.prompt_mask[0], [False, False, True, True, True])
    np.testing.assert_array_equal(both.mask[2], [True, True, False, False])
    np.testing.assert_array_equal(both.tokens[2], [3, 3, 0, 0])
    picked = both.rows(np.array([2, 0]))
    np.testing.assert_array_equal(picked.rewards, [10.0, 0.0])
    assert picked.texts == ("t10", "t0") and picked.examples == (10, 0)
    assert both.rows(slice(1, 3)).texts == ("t1", "t10")
    np.testing.assert_array_equal(both.correct, [False, True, True])
