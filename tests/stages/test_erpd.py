"""ERPD: stage-1 losses and stage-2 rewards against NumPy on hand batches, 1 vs 8 devices, and
toy runs showing each strategy's intended direction."""

import json
import os
import signal
import subprocess
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import models, pipelines, runtime, scoring
from bridge.pipelines import erpd as erpd_report
from bridge.stages import common as stage_common, erpd
from configs import common
from configs.erpd import toy
from safetensors.numpy import load_file
from stage_helpers import hand_batch, one_update, reference_logp, stage_records, tiny_model
from launch_helpers import REPO, run_train, stable_records, train_cmd


def _jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _teacher_batch():
    batch = hand_batch()
    batch["rewards"] = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
    return batch


def _weights(mask, aggregation):
    m = mask.astype(np.float64)
    return m if aggregation == "sum" else m / np.maximum(m.sum(1, keepdims=True), 1)


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_teacher_implicit_reward_losses_equal_numpy(loss, aggregation):
    """z_b = beta * agg_t (log pi - log pi_old); CE: mean_b softplus(z) - y z; MSE: mean_b (z - r)^2."""
    model, batch = tiny_model(), _teacher_batch()
    scfg = common.erpd_teacher_stage("t", 1e-3, 1, teacher_loss=loss, aggregation=aggregation, beta=0.3,
                                     sampling=common.sampling(4, temperature=0.6))
    got, metrics = erpd.teacher_loss(scfg)(model, _jnp(batch), None)
    _, logp = reference_logp(model, batch, 0.6)
    z = 0.3 * ((logp - batch["old_logp"]) * _weights(batch["mask"], aggregation)).sum(1)
    y = batch["rewards"]
    want = np.mean(np.logaddexp(0, z) - y * z) if loss == "ce" else np.mean((z - y) ** 2)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    if loss == "ce":
        np.testing.assert_allclose(float(metrics["implicit_reward_accuracy"]), np.mean((z > 0) == (y > 0.5)))


@pytest.mark.parametrize("loss", ["grpo", "sapo"])
def test_teacher_policy_losses_equal_numpy(loss):
    model, batch = tiny_model(), _teacher_batch()
    scfg = common.erpd_teacher_stage("t", 1e-3, 1, teacher_loss=loss, clip_low=0.2, clip_high=0.28,
                                     tau_pos=1.0, tau_neg=1.05, kl_coef=0.1)
    got, _ = erpd.teacher_loss(scfg)(model, _jnp(batch), None)
    _, logp = reference_logp(model, batch, 0.6)  # scored at the sampling temperature (0.6 by default)
    m = batch["mask"].astype(np.float64)
    d = np.where(m > 0, logp - batch["old_logp"], 0.0)
    rho, a = np.exp(d), batch["advantages"][:, None]
    if loss == "grpo":
        per = -np.minimum(rho * a, np.clip(rho, 0.8, 1.28) * a)
    else:  # SAPO: -(4 / tau) sigmoid(tau (rho - 1)) A
        tau = np.where(a > 0, 1.0, 1.05)
        per = -(4 / tau) / (1 + np.exp(-tau * (rho - 1))) * a
    kl = np.expm1(-d) + d  # k3 with ref = pi_old
    want = (per * m).sum() / m.sum() + 0.1 * (kl * m).sum() / m.sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _np_whiten(x, m):
    mean = (x * m).sum() / m.sum()
    var = (((x - mean) * m) ** 2).sum() / (m.sum() - 1)
    return np.where(m > 0, (x - mean) / np.sqrt(var + 1e-8), 0.0)


@pytest.mark.parametrize("strategies,weights", [(("s1",), ()), (("s2",), ()), (("s3",), ()),
                                                (("s1", "s3"), (0.25, 0.75))])
def test_strategy_rewards_equal_numpy(strategies, weights):
    rng = np.random.default_rng(0)
    shape = (6, 5)
    logps = {k: -rng.uniform(0.1, 4, shape) for k in ("teacher", "old", "unlearned", "weak")}
    mask = (rng.random(shape) < 0.8).astype(np.float64)
    pairs = {"s1": ("teacher", "old"), "s2": ("teacher", "unlearned"), "s3": ("old", "weak")}
    signals = [_np_whiten(logps[a] - logps[b], mask) for a, b in (pairs[s] for s in strategies)]
    w = np.asarray(weights or [1.0] * len(signals))
    want = sum(wi * si for wi, si in zip(w, signals)) / w.sum()
    got = erpd.strategy_rewards({k: jnp.asarray(v, jnp.float32) for k, v in logps.items()},
                                jnp.asarray(mask, jnp.float32), strategies, weights)
    np.testing.assert_allclose(np.asarray(got) * mask, want * mask, rtol=1e-4, atol=1e-5)


def test_distill_models_and_checks_name_what_is_missing():
    scfg = common.erpd_distill_stage("student", 1e-3, 1, strategies=("s3",), weak="")
    with pytest.raises(ValueError, match="reads the 'weak' model"):
        erpd.check_distill("d", scfg)
    with pytest.raises(ValueError, match="choose from"):
        erpd.check_distill("d", common.erpd_distill_stage("student", 1e-3, 1, strategies=("s9",)))
    scfg = common.erpd_distill_stage("student", 1e-3, 1, strategies=("s1", "s2"), unlearned="artifact:t/step2")
    assert erpd.distill_models(scfg) == {"policy": "student", "teacher": "erpd_teacher", "unlearned": "artifact:t/step2"}


def test_distill_update_on_8_devices_equals_1_device():
    scfg = common.erpd_distill_stage("student", 1e-2, 1, kl_coef=0.05, entropy_coef=0.01)
    batch = hand_batch()
    batch["advantages"] = np.random.default_rng(3).normal(size=batch["mask"].shape).astype(np.float32)
    keys = erpd.distill_batch_spec(scfg, 8, 5, 7)
    one_params, one_metrics = one_update(erpd.DISTILL, scfg, tiny_model(), batch, keys, jax.devices()[:1])
    eight_params, eight_metrics = one_update(erpd.DISTILL, scfg, tiny_model(), batch, keys, jax.devices())
    chex.assert_trees_all_close(one_params, eight_params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(one_metrics["loss"], eight_metrics["loss"], rtol=1e-5)


def _smoke(tmp_path, variant, **distill):
    cfg = toy.get_config(f"smoke,{variant}" if variant else "smoke")
    with cfg.unlocked():
        cfg.metrics.plots = False
        cfg.stages.erpd_distill.update(distill)
    pipelines.run(cfg, str(tmp_path))
    return cfg


@pytest.mark.parametrize("variant", ["s1", "s2"])
def test_distill_raises_the_reward_on_the_batch(tmp_path, variant):
    """Strategies 1 and 2: the surrogate gain mean_t A_t (log pi - log pi_old) on the fixed
    batch rises from 0 over the distillation updates."""
    _smoke(tmp_path, variant, steps=6, track_every=2)
    gains = [r["surrogate_gain"] for r in stage_records(tmp_path, "erpd_distill@1") if "surrogate_gain" in r]
    assert len(gains) == 4 and 0 < gains[0] < gains[-1], gains  # after updates 1, 2, 4, 6
    teacher = stage_records(tmp_path, "erpd_teacher@1")
    assert (tmp_path / "artifacts" / "erpd_teacher@1" / "batch.npz").exists()
    assert any("kl_old_k3" in r for r in teacher) and (tmp_path / "models" / "erpd_teacher@1").is_dir()
    results = json.loads((tmp_path / "results.json").read_text())["stages"]  # KL to the base (the SFT student)
    assert results["student_sft"]["kl_to_reference"] == 0.0
    assert results["erpd_teacher@1"]["kl_to_reference"] > 0 and results["erpd_distill@1"]["kl_to_reference"] > 0
    assert "| 1 | student | erpd_distill@1 | student_sft |" in (tmp_path / "erpd_table.md").read_text()


def test_strategy_3_moves_the_student_away_from_the_weak_policy_on_the_batch(tmp_path):
    """s3's reward is log pi_old - log pi_weak: after distillation the student's log-likelihood
    of the fixed batch's tokens has moved up where the weak policy (the teacher's step-2
    snapshot) is below pi_old and down where it is above, i.e. sum_t A_t (log pi_new - log pi_old)
    > 0 for A the whitened (log pi_old - log pi_weak), all scored here from the saved models."""
    _smoke(tmp_path, "s3", steps=8)
    with np.load(tmp_path / "artifacts" / "erpd_teacher@1" / "batch.npz") as f:
        batch = {k: f[k] for k in f.files}
    arrays = _jnp({k: batch[k] for k in stage_common.Rollout.TOKEN_KEYS})

    def logp(path):
        return np.asarray(scoring.completion_logprobs(models.load_hf(str(path)), arrays), np.float64)

    mask = batch["mask"].astype(bool)
    old, new = logp(tmp_path / "models" / "student_sft"), logp(tmp_path / "models" / "erpd_distill@1")
    weak = logp(tmp_path / "artifacts" / "erpd_teacher@1" / "step2")
    away = (old - weak)[mask]
    advantage = (away - away.mean()) / away.std()
    moved = (new - old)[mask]
    assert (advantage * moved).mean() > 0, (advantage * moved).mean()
    assert np.abs(moved).max() > 0


@pytest.mark.parametrize("variant,teacher_init", [("iterative", "erpd_distill@1"), ("no_distill", "erpd_teacher@1")])
def test_the_table_names_what_each_round_started_from(variant, teacher_init):
    """Round 2's teacher starts from round 1's student (ERPD) or round 1's teacher (the control)."""
    cfg = toy.get_config(f"smoke,{variant}")
    units = [u for u, _, _ in runtime.pipeline_units(cfg)][:5]
    results = {u.id: {"accuracy": 0.1 * i, "kl_to_reference": 0.01 * i, "train_time_s": 1.0}
               for i, u in enumerate(units)}
    rows = {r["unit"]: r for r in erpd_report.table_rows(cfg, results)}
    assert rows["erpd_teacher@2"]["init"] == teacher_init and rows["erpd_teacher@2"]["round"] == 2
    assert rows["erpd_teacher@1"]["init"] == "student_sft" and rows["student_sft"]["role"] == "base"
    assert rows["erpd_teacher@2"]["role"] == "teacher"
    if variant == "iterative":
        assert rows["erpd_distill@1"]["init"] == "student_sft" and rows["erpd_distill@2"]["init"] == "erpd_distill@1"
    table = erpd_report.markdown(list(rows.values()))
    assert table.count("\n") == len(rows) + 2 and "| 2 | teacher | erpd_teacher@2 |" in table


def _kill_when(workdir, ready, overrides):
    """Starts the 2-round smoke run on `workdir`, SIGKILLs it once `ready()` holds."""
    proc = subprocess.Popen(train_cmd("configs/erpd/toy.py:smoke,iterative", workdir, *overrides), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 600
    while not ready():
        assert proc.poll() is None, "the run ended before the kill point: " + proc.communicate()[1][-2000:].decode()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _cursor(workdir):
    try:
        return json.loads((workdir / "cursor.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _final_state(workdir):
    return load_file(str(workdir / "models" / "erpd_distill@2" / "model.safetensors")), stable_records(workdir)


@pytest.mark.slow  # four launches of a two-round run: about 2-4 minutes on 2 cores
def test_round_2_resumes_after_sigkill_inside_and_between_its_stages(tmp_path):
    """Killed inside round 2's teacher, between its teacher and its distillation, and inside the
    distillation, resumed each time: weights and metrics equal an uninterrupted run."""
    overrides = ("--config.pipeline.blocks.round.repeat=2", "--config.checkpoint.every=1",
                 "--config.metrics.plots=False", "--config.metrics.progress=False")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_train("configs/erpd/toy.py:smoke,iterative", straight, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    kill_points = [lambda: _cursor(killed).get("stage") == "erpd_teacher@2" and _cursor(killed).get("step", 0) >= 2,
                   lambda: (killed / "stages" / "erpd_teacher@2" / "DONE.json").exists(),
                   lambda: _cursor(killed).get("stage") == "erpd_distill@2" and _cursor(killed).get("step", 0) >= 2]
    for ready in kill_points:
        _kill_when(killed, ready, overrides)
    assert not (killed / "stages" / "erpd_distill@2" / "DONE.json").exists()
    resumed = run_train("configs/erpd/toy.py:smoke,iterative", killed, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    params_a, records_a = _final_state(straight)
    params_b, records_b = _final_state(killed)
    assert records_a == records_b
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name], err_msg=name)
