"""Self-distillation with privileged context: two-prompt scoring against a per-row loop over
unpadded sequences, each loss against the objectives library, SRPO routing and weights on
hand batches, the missing-context stop, 1 vs 8 devices, learning runs and a SIGKILL resume."""

import os
import signal
import subprocess
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bridge import losses, mesh as mesh_lib, runtime, scoring, train_state
from bridge.stages import common as stage_common, self_distill
from bridge.tasks.base import Example, MissingContextError, RewardResult, Task
from configs import common
from configs.self_distill import toy
from launch_helpers import REPO, stable_records, train_cmd
from stage_helpers import hand_batch, tiny_model

VOCAB = 23


def _batch(rows=8, seed=0):
    """hand_batch plus teacher prompts 9 wide, left-padded to different lengths per row, and
    the self-distillation keys."""
    rng = np.random.default_rng(seed + 1)
    batch = hand_batch(rows=rows, seed=seed)
    batch["prompt_mask"][3, :1] = False
    t_mask = np.ones((rows, 9), bool)
    for r, pad in enumerate([0, 3, 1, 5, 2, 0, 4, 1][:rows]):
        t_mask[r, :pad] = False
    batch.update(teacher_prompt_tokens=rng.integers(0, VOCAB, (rows, 9)).astype(np.int32), teacher_prompt_mask=t_mask,
                 sd_weight=rng.uniform(0.2, 1.5, batch["mask"].shape).astype(np.float32),
                 rl_weight=np.zeros(rows, np.float32), rl_advantages=np.zeros(rows, np.float32),
                 advantages=rng.normal(size=batch["mask"].shape).astype(np.float32))
    return batch


def _jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _loop_logits(model, batch, teacher=False):
    """Logits [B, N, V] predicting each completion token, each row from its own unpadded
    sequence (one model call per row, no attention mask)."""
    key = "teacher_prompt" if teacher else "prompt"
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, seq: nnx.merge(graphdef, st)(seq))
    rows = []
    for prompt, prompt_mask, tokens in zip(batch[f"{key}_tokens"], batch[f"{key}_mask"], batch["tokens"]):
        p = int(prompt_mask.sum())
        logits = forward(state, np.concatenate([prompt[prompt_mask], tokens])[None])
        rows.append(np.asarray(logits, np.float64)[0, p - 1:p - 1 + len(tokens)])
    return np.stack(rows)


def _log_softmax(logits):
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _gather(logp, tokens):
    return np.take_along_axis(logp, tokens[..., None], -1)[..., 0]


def test_one_completion_under_two_prompts_equals_a_per_row_loop():
    """Student logprobs after the plain prompts and teacher logprobs (and entropies) after the
    privileged ones, of the same completion tokens, equal each row scored alone without padding."""
    model, batch = tiny_model(), _batch()
    mask = batch["mask"]
    student = scoring.completion_logprobs(model, _jnp(batch))
    teacher, entropy = scoring.completion_logprobs(model, self_distill.teacher_batch(_jnp(batch)),
                                                   return_entropy=True)
    s_logp, t_logp = _log_softmax(_loop_logits(model, batch)), _log_softmax(_loop_logits(model, batch, True))
    np.testing.assert_allclose(np.asarray(student)[mask], _gather(s_logp, batch["tokens"])[mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(teacher)[mask], _gather(t_logp, batch["tokens"])[mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy)[mask], -(np.exp(t_logp) * t_logp).sum(-1)[mask], atol=1e-5)
    assert np.abs(np.asarray(student - teacher)[mask]).max() > 1e-2  # the two prompts do differ


def _reference_divergence(kind, student_logits, teacher_logits, beta=0.5, top_k=0):
    s, t = jnp.asarray(student_logits, jnp.float32), jnp.asarray(teacher_logits, jnp.float32)
    if top_k:
        fn = {"reverse_kl": losses.topk_reverse_kl, "forward_kl": losses.topk_forward_kl}[kind]
        return np.asarray(fn(s, t, top_k))
    if kind == "jsd":
        return np.asarray(losses.generalized_jsd(s, t, beta=beta))
    return np.asarray({"reverse_kl": losses.reverse_kl, "forward_kl": losses.forward_kl,
                       "forward_ce": losses.forward_cross_entropy}[kind](s, t))


@pytest.mark.parametrize("kind,beta,top_k", [("jsd", 0.5, 0), ("jsd", 0.2, 0), ("reverse_kl", 0.5, 0),
                                             ("forward_kl", 0.5, 0), ("forward_ce", 0.5, 0),
                                             ("reverse_kl", 0.5, 4)])
@pytest.mark.parametrize("teacher", ["frozen", "live"])
def test_divergence_losses_equal_the_objectives_library(kind, beta, top_k, teacher):
    """sum_t w_t D(S_t || T_t) / sum_t w_t, the per-position divergence from bridge.losses on
    logits of rows scored one at a time (teacher: another model, or the student itself)."""
    student = tiny_model(0)
    teacher_model = tiny_model(1, layers=2) if teacher == "frozen" else student
    batch = _batch()
    scfg = common.self_distill_stage("student", 1e-3, 1, loss=kind, beta=beta, divergence_top_k=top_k,
                                     teacher=teacher)
    graphdef, state = nnx.split(teacher_model)
    frozen = [state] if teacher == "frozen" else None
    loss, metrics = self_distill.make_loss_fn(scfg, [graphdef])(student, _jnp(batch), frozen)
    per_token = _reference_divergence(kind, _loop_logits(student, batch), _loop_logits(teacher_model, batch, True),
                                      beta, top_k)
    w = batch["mask"] * batch["sd_weight"]
    np.testing.assert_allclose(float(loss), (per_token * w).sum() / w.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["sd_loss"]), float(loss), rtol=1e-6)


def test_sampled_reverse_kl_and_srpo_losses_equal_the_objectives_library():
    """The sampled path is the clipped surrogate of the dense advantages on the distilled
    tokens; with SRPO the GRPO surrogate of the correct rows joins it in one token mean."""
    model, batch = tiny_model(), _batch()
    batch["rl_weight"] = np.array([1, 0, 0, 1, 0, 1, 0, 0], np.float32)
    batch["rl_advantages"] = np.array([0.7, 0, 0, 1.2, 0, 0.4, 0, 0], np.float32)
    batch["sd_weight"] *= (1 - batch["rl_weight"])[:, None]
    logp = _gather(_log_softmax(_loop_logits(model, batch)), batch["tokens"])
    mask = batch["mask"].astype(np.float64)
    sd_mask, rl_mask = mask * batch["sd_weight"], mask * batch["rl_weight"][:, None]
    sd, _ = losses.clipped_surrogate(logp, batch["old_logp"], batch["advantages"], sd_mask, clip_low=0.2,
                                     clip_high=0.28)
    rl, _ = losses.clipped_surrogate(logp, batch["old_logp"], batch["rl_advantages"], rl_mask, clip_low=0.2,
                                     clip_high=0.28)
    for route, want in (("", float(sd)), ("srpo", (float(sd) * sd_mask.sum() + float(rl) * rl_mask.sum())
                                          / (sd_mask.sum() + rl_mask.sum()))):
        scfg = common.self_distill_stage("student", 1e-3, 1, loss="sampled_reverse_kl", route=route, clip_high=0.28)
        b = dict(batch) if route else {**batch, "rl_weight": np.zeros(8, np.float32)}
        loss, _ = self_distill.make_loss_fn(scfg, ())(model, _jnp(b), None)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_srpo_routes_correct_samples_to_grpo_and_failed_ones_to_distillation():
    rewards = np.array([1, 0, 0, 1, 0, 0, 0, 0], np.float32)  # two groups of 4
    has_context = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)
    scfg = common.self_distill_stage("s", 1e-3, 1, route="srpo", sampling=common.sampling(4))
    sd, rl, adv = self_distill.routes(scfg, rewards, rewards >= 1, has_context)
    np.testing.assert_array_equal(rl, [1, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(sd, [0, 1, 1, 0, 1, 1, 0, 1])
    grpo = (1 - 0.5) / np.std([1, 0, 0, 1], ddof=1)  # GRPO advantage of a correct sample in group 1
    np.testing.assert_allclose(adv, [grpo, 0, 0, grpo, 0, 0, 0, 0], rtol=1e-5)
    plain = common.self_distill_stage("s", 1e-3, 1, sampling=common.sampling(4))
    sd, rl, adv = self_distill.routes(plain, rewards, rewards >= 1, has_context)
    np.testing.assert_array_equal(sd, has_context)
    assert not rl.any() and not adv.any()


def test_srpo_entropy_weights_down_weight_high_entropy_targets():
    entropy = np.array([[0.1, 2.0, 0.5], [1.0, 3.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    got = np.asarray(self_distill.entropy_weights(jnp.asarray(entropy), jnp.asarray(mask), 0.5))
    e = np.exp(-entropy / 0.5) * mask
    np.testing.assert_allclose(got, mask.sum() * e / e.sum(), rtol=1e-5)
    assert got[0, 2] == 0 and got[1, 2] > got[1, 0] > got[1, 1]


def _no_solution_task():
    examples = [Example(f"train/{i}", f"{i}+{i}=", str(2 * i)) for i in range(4)]
    return Task(name="nosol", load_split=lambda split: examples,
                reward_fn=lambda text, e: RewardResult(float(text == e.answer), True, text))


def test_opsd_on_a_task_without_reference_solutions_stops_before_training(tmp_path):
    task = _no_solution_task()
    for mode in ("opsd", "hint"):
        with pytest.raises(MissingContextError, match=r"Task 'nosol' .*'%s'.*no reference solution \(Example.solution\)"
                           % mode):
            task.check_context(mode, task.examples("train"))
    with pytest.raises(MissingContextError, match=r"Task 'nosol' .*'critique'.*step_checker"):
        task.check_context("critique", task.examples("train"))
    task.check_context("sdpo", task.examples("train"))  # the verifier is enough
    cfg = toy.get_config("opsd,smoke")
    ctx = runtime.make_context(cfg, str(tmp_path))
    ctx.task = task
    unit = runtime.Unit("self_distill")
    with pytest.raises(MissingContextError, match="Task 'nosol' cannot supply the 'opsd' context"):
        self_distill.KIND.build(ctx, unit, cfg.stages.self_distill)
    assert not (tmp_path / "checkpoints").exists()


def _one_update(devices, loss, teacher, route):
    mesh = mesh_lib.make_mesh((1, -1, 1), devices=devices)
    scfg = common.self_distill_stage("student", 1e-2, 1, loss=loss, teacher=teacher, route=route)
    model = tiny_model()
    graphdef, params = nnx.split(model)
    tx = stage_common.optimizer(scfg, 1)
    if teacher == "ema":
        tx = self_distill.with_ema(tx, 0.9)
    state = train_state.init_state(params, tx)
    sh = train_state.state_shardings(state, mesh, None)
    state = jax.device_put(state, sh)
    frozen_graphdefs = (graphdef,) if self_distill.frozen_roles(scfg) else ()
    step = stage_common.make_update(self_distill.KIND, scfg, graphdef, frozen_graphdefs, tx, sh)
    batch = _batch()
    batch["rl_weight"] = np.array([1, 0, 0, 1, 0, 1, 0, 0], np.float32) if route else np.zeros(8, np.float32)
    batch["rl_advantages"] = batch["rl_weight"] * 0.8
    with jax.set_mesh(mesh):
        placed = {k: jax.device_put(jnp.asarray(batch[k]), runtime.sharding.batch_sharding(mesh, batch[k].ndim,
                                                                                           shape=batch[k].shape))
                  for k in self_distill.batch_spec(scfg, 8, 5, 7)}
        frozen = None
        if frozen_graphdefs:
            teacher_params = nnx.split(tiny_model(1))[1]
            frozen = [jax.device_put(teacher_params, runtime.sharding.state_shardings(teacher_params, mesh, None))]
        new, metrics = step(state, placed, frozen)
    return jax.device_get(new), jax.device_get(metrics)


@pytest.mark.parametrize("loss,teacher,route", [("jsd", "frozen", "srpo"), ("sampled_reverse_kl", "ema", ""),
                                                pytest.param("forward_kl", "live", "", marks=pytest.mark.slow)])
def test_update_on_8_devices_equals_1_device(loss, teacher, route):
    one, one_metrics = _one_update(jax.devices()[:1], loss, teacher, route)
    eight, eight_metrics = _one_update(jax.devices(), loss, teacher, route)
    chex.assert_trees_all_close(one.params, eight.params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(one_metrics["loss"], eight_metrics["loss"], rtol=1e-5)
    if teacher == "ema":  # ema = 0.9 theta_0 + 0.1 theta_1, carried in the optimizer state
        chex.assert_trees_all_close(one.opt_state.ema, eight.opt_state.ema, atol=1e-5, rtol=1e-5)
        theta0 = nnx.split(tiny_model())[1]
        want = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, theta0, one.params)
        chex.assert_trees_all_close(one.opt_state.ema, want, atol=1e-6, rtol=1e-6)


def _learning_run(tmp_path, variant, steps=8, **overrides):
    """The variant's stage program on the smoke config (random tiny student, 4 fixed prompts),
    stepped in process; returns the per-step metrics."""
    cfg = toy.get_config(f"{variant},smoke")
    with cfg.unlocked():
        cfg.task.options.num_train = 4
        stage = cfg.stages.self_distill
        stage.update(steps=steps, prompts_per_step=4, **overrides)
        stage.optimizer.lr = 1e-2
    ctx = runtime.make_context(cfg, str(tmp_path))
    unit = runtime.Unit("self_distill")
    ctx.current = unit
    program = self_distill.KIND.build(ctx, unit, stage)
    state, out = program.state, []
    with runtime.sharding.use_mesh(ctx.mesh, ctx.rules):
        for i in range(steps):
            state, metrics = program.step(state, i)
            out.append(metrics)
    ctx.writer.close()
    return out


@pytest.mark.parametrize("variant", ["opsd", "sdpo", "hint", "critique", pytest.param("srpo", marks=pytest.mark.slow)])
def test_the_teacher_student_divergence_falls(tmp_path, variant):
    """A frozen self-teacher with the variant's context on 4 fixed hard prompts: the distilled
    divergence of the last steps is below that of the first steps."""
    m = _learning_run(tmp_path, variant)
    div = [r["sd_loss"] for r in m]
    assert np.mean(div[-2:]) < 0.7 * np.mean(div[:2]), div
    assert all(r["route_sd_frac"] > 0 for r in m)
    if variant == "srpo":
        assert all(abs(r["route_sd_frac"] + r["route_rl_frac"] - 1) < 1e-6 for r in m)


# ---- resume after SIGKILL (EMA teacher) ---------------------------------------------------------

CONFIG = '''
from configs.self_distill import toy


def get_config(arg=None):
    c = toy.get_config("sdpo,ema,smoke")
    with c.unlocked():
        c.stages.self_distill.update(steps=4, ema_decay=0.5)
        c.stages.self_distill.optimizer.lr = 1e-2
        c.checkpoint.every = 1
        c.metrics.plots = False
    return c
'''


def _finish(proc, timeout=900):
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _train(config, workdir, **kw):
    return subprocess.Popen(train_cmd(config, workdir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.mark.slow
def test_ema_teacher_resumes_after_sigkill_exactly(tmp_path):
    """Killed after self_distill step 2 and resumed: weights and metrics equal a straight run,
    so the EMA teacher (in the checkpointed optimizer state) continued exactly."""
    from safetensors.numpy import load_file

    config = tmp_path / "sd_config.py"
    config.write_text(CONFIG)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _finish(_train(config, straight))
    proc = _train(config, killed, start_new_session=True)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and '"stage": "self_distill", "step": 2' in metrics.read_text():
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "self_distill").exists()
    _finish(_train(config, killed))
    a, b = (load_file(str(run / "models" / "self_distill" / "model.safetensors")) for run in (straight, killed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert stable_records(straight) == stable_records(killed)
    assert len([r for r in stable_records(straight) if r["stage"] == "self_distill" and "loss" in r]) == 4
