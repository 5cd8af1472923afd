"""Stages: loss parity with the objectives library, 1 vs 8 devices, learning, failures."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bridge import checkpoint, losses, mesh as mesh_lib, models, pipelines, runtime, train_state
from bridge.stages import opd, rl
from configs import common
from stage_helpers import hand_batch, reference_logp, smoke_config, tiny_model


def test_rl_loss_equals_objectives_library():
    model = tiny_model()
    batch = hand_batch()
    scfg = common.rl_stage("student", 1e-3, 1, sampling=common.sampling(temperature=0.7), kl_coef=0.1, kl_kind="k3", entropy_coef=0.01,
                           loss_kwargs=common.cd(clip_low=0.2, clip_high=0.28))
    loss, metrics = rl.make_loss_fn(scfg)(model, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    logits, logp = reference_logp(model, batch, 0.7)
    mask = batch["mask"] * batch["row_weight"][:, None]
    adv = batch["advantages"][:, None] * batch["tis_weight"]
    want, _ = losses.clipped_surrogate(logp, batch["old_logp"], adv, mask, clip_low=0.2, clip_high=0.28)
    want += 0.1 * losses.aggregate(losses.kl_estimate(logp, batch["ref_logp"], "k3"), mask)
    ent = -(jax.nn.softmax(logits) * jax.nn.log_softmax(logits)).sum(-1)
    want -= 0.01 * losses.aggregate(ent, mask)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["entropy_bonus"]), float(losses.masked_mean(ent, mask)), rtol=1e-5)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_opd_full_vocabulary_loss_equals_objectives_library(kind):
    student, teacher = tiny_model(0), tiny_model(1, layers=2)
    batch = hand_batch()
    scfg = common.opd_stage("student", 1e-3, 1, loss=kind)
    graphdef, state = nnx.split(teacher)
    loss, _ = opd.make_loss_fn(scfg, [graphdef])(student, {k: jnp.asarray(v) for k, v in batch.items()},
                                                         [state])
    s_logits, _ = reference_logp(student, batch)
    t_logits, _ = reference_logp(teacher, batch)
    per_token = getattr(losses, kind)(s_logits, t_logits)
    np.testing.assert_allclose(float(loss), float(losses.masked_mean(per_token, batch["mask"])), rtol=1e-5)


def _one_rl_update(devices, microbatches=1):
    mesh = mesh_lib.make_mesh((1, -1, 1), devices=devices)
    scfg = common.rl_stage("student", 1e-2, 1)
    graphdef, params = nnx.split(tiny_model())
    tx = train_state.make_optimizer(scfg.optimizer)
    state = train_state.init_state(params, tx)
    sh = train_state.state_shardings(state, mesh, None)
    state = jax.device_put(state, sh)
    step = train_state.make_update_step(graphdef, rl.make_loss_fn(scfg), tx, state_sharding=sh,
                                        microbatches=microbatches)
    batch = {k: jnp.asarray(v) for k, v in hand_batch().items()}
    with jax.set_mesh(mesh):
        batch = {k: jax.device_put(v, runtime.sharding.batch_sharding(mesh, v.ndim, shape=v.shape))
                 for k, v in batch.items()}
        new, metrics = step(state, batch, None)
    return jax.device_get(new.params), jax.device_get(metrics)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_update_step_on_8_devices_equals_1_device(microbatches):
    one_params, one_metrics = _one_rl_update(jax.devices()[:1], microbatches)
    eight_params, eight_metrics = _one_rl_update(jax.devices(), microbatches)
    chex.assert_trees_all_close(one_params, eight_params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(one_metrics["loss"], eight_metrics["loss"], rtol=1e-5)


@pytest.mark.parametrize("kind,overrides", [
    ("rl", dict(aggregation="token-mean", kl_coef=0.1)),
    ("rl", dict(aggregation="seq-mean-token-sum", loss="gspo")),
    ("opd", dict(loss="sampled_reverse_kl")),
    ("opd", dict(loss="jsd")),
    ("sft", dict(loss="forward_kl")),
])
def test_microbatches_accumulate_the_whole_batch_gradient(kind, overrides):
    """k strided slices weighted by their token counts (token-mean) or rows: the same loss,
    gradient and metrics as one pass over the batch (rows 2-3 of the hand batch are empty)."""
    from bridge.stages import common as stage_common, sft

    student, teacher = tiny_model(0), tiny_model(1, layers=2)
    graphdef, params = nnx.split(student)
    t_graphdef, t_state = nnx.split(teacher)
    if kind == "rl":
        scfg = common.rl_stage("student", 1e-3, 1, **overrides)
        loss_fn, frozen = rl.make_loss_fn(scfg), None
        weight = rl.microbatch_weight(scfg)
    elif kind == "opd":
        loss_fn, frozen = opd.make_loss_fn(common.opd_stage("student", 1e-3, 1, **overrides), [t_graphdef]), [t_state]
        weight = stage_common.token_count("token_weight")
    else:
        loss_fn, frozen = sft.make_loss_fn(common.sft_stage("student", 1e-3, 1, **overrides), t_graphdef), (t_state,)
        weight = stage_common.token_count()
    batch = hand_batch()
    if kind == "opd":  # per-token advantages, as the opd stage makes them
        batch["advantages"] = np.random.default_rng(1).normal(size=batch["mask"].shape).astype(np.float32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    objective = lambda p, b: loss_fn(nnx.merge(graphdef, p), b, frozen)  # noqa: E731
    whole = jax.jit(lambda p, b: train_state.accumulate_gradients(objective, p, b, 1))(params, batch)
    for k in (2, 4):
        sliced = jax.jit(lambda p, b: train_state.accumulate_gradients(objective, p, b, k, weight))(params, batch)
        chex.assert_trees_all_close(sliced[0][0], whole[0][0], rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(sliced[1], whole[1], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="8 rows do not split into 3 micro-batches"):
        train_state.accumulate_gradients(objective, params, batch, 3)


def test_update_step_skips_nonfinite_loss():
    graphdef, params = nnx.split(tiny_model())
    tx = train_state.make_optimizer(common.optimizer(1e-2))
    state = train_state.init_state(params, tx)
    before = jax.device_get(state.params)

    def loss_fn(model, batch, frozen):
        loss = jnp.mean(model(batch["ids"])) * batch["scale"]
        return loss, {}

    step = train_state.make_update_step(graphdef, loss_fn, tx)
    bad = {"ids": jnp.ones((2, 3), jnp.int32), "scale": jnp.float32(jnp.nan)}
    state, m = step(state, bad, None)
    assert int(state.skipped) == 1 and int(state.step) == 0 and float(m["update_skipped"]) == 1.0
    chex.assert_trees_all_equal(jax.device_get(state.params), before)
    state, m = step(state, dict(bad, scale=jnp.float32(1.0)), None)
    assert int(state.skipped) == 0 and int(state.step) == 1


def test_run_stage_stops_after_consecutive_nonfinite_updates(tmp_path):
    cfg = smoke_config(["student_sft"])
    ctx = runtime.make_context(cfg, str(tmp_path))
    graphdef, params = nnx.split(tiny_model())
    tx = train_state.make_optimizer(common.optimizer(1e-3))
    state0 = train_state.init_state(params, tx)

    def loop(ctx, unit, scfg, kind):
        def step(state, i):
            return state.replace(skipped=jnp.int32(max(0, i - 1))), {"loss": jnp.float32(i)}
        return runtime.StageProgram(graphdef, state0, step)

    scfg = common.cd(model="student", steps=10)
    flaky = dataclasses.replace(rl.KIND, loop=loop)
    with pytest.raises(runtime.NonFiniteError, match="3 consecutive non-finite"):
        runtime.run_stage(ctx, runtime.Unit("flaky"), scfg, flaky)
    ckpt = checkpoint.StageCheckpoints(str(tmp_path), "flaky")
    assert ckpt.latest_step() == 4  # skipped updates leave params untouched
    assert not (tmp_path / "models" / "flaky").exists()


def test_sft_stage_learns(tmp_path):
    cfg = smoke_config(["student_sft"], student_sft__steps=12, student_sft__batch_size=16)
    cfg.stages.student_sft.optimizer.lr = 1e-2
    pipelines.run(cfg, str(tmp_path))
    losses_ = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(x)]
    assert np.mean(losses_[-3:]) < 0.8 * np.mean(losses_[:3])


def test_unknown_stage_kind_and_loss_are_named(tmp_path):
    cfg = smoke_config(["student_rl"], student_rl__kind="rll")
    with pytest.raises(ValueError, match="Unknown stage kind 'rll'"):
        pipelines.run(cfg, str(tmp_path / "a"))
    cfg = smoke_config(["student_rl"], student_rl__loss="grpoo")
    with pytest.raises(ValueError, match="Unknown policy loss 'grpoo'"):
        pipelines.run(cfg, str(tmp_path / "b"))
    cfg = smoke_config(["nonexistent"])
    with pytest.raises(ValueError, match="'nonexistent' is not defined"):
        pipelines.run(cfg, str(tmp_path / "c"))


def test_teacher_with_another_tokenizer_stops_at_startup(tmp_path):
    other = models.char_tokenizer("abcdefghij")
    teacher = models.Decoder(models.ModelConfig(
        family="qwen3", vocab_size=len(other), hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True), rngs=nnx.Rngs(0))
    models.save_hf(teacher, str(tmp_path / "teacher"), tokenizer=other)
    cfg = smoke_config(["warmup"])
    cfg.models.teacher.hf_dir = str(tmp_path / "teacher")
    with pytest.raises(ValueError, match="teacher tokenizer differs"):
        pipelines.run(cfg, str(tmp_path / "run"))


def test_corrupted_checkpoint_stops_and_is_kept(tmp_path):
    cfg = smoke_config(["student_sft"], student_sft__steps=2)
    pipelines.run(cfg, str(tmp_path))
    os.remove(tmp_path / "models" / "student_sft" / runtime.DONE)  # pretend the stage never finished
    state_dir = tmp_path / "checkpoints" / "student_sft" / "2" / "state"
    for root, _, files in os.walk(state_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    listing = sorted(p.name for p in state_dir.rglob("*"))
    with pytest.raises(checkpoint.CheckpointError, match="Cannot restore the checkpoint"):
        pipelines.run(cfg, str(tmp_path))
    assert sorted(p.name for p in state_dir.rglob("*")) == listing


def test_resuming_with_another_config_is_refused(tmp_path):
    pipelines.run(smoke_config(["student_sft"], student_sft__steps=1), str(tmp_path))
    cfg = smoke_config(["student_sft"], student_sft__steps=1)
    cfg.models.student.arch.hidden_size = 32
    with pytest.raises(checkpoint.CheckpointError, match="different config.*models.student.arch.hidden_size"):
        pipelines.run(cfg, str(tmp_path))


def test_a_knob_added_later_resumes_when_off_and_is_refused_when_on(tmp_path):
    """A run saved before a knob existed resumes under a config that has it off (the code's
    default), and is refused when the new knob is on."""
    import json

    pipelines.run(smoke_config(["student_sft"], student_sft__steps=1), str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["stages"]["student_sft"]["sampling"]["refill"]  # as if written before the knob existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    pipelines.run(smoke_config(["student_sft"], student_sft__steps=1), str(tmp_path))  # 0.0: off
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = smoke_config(["student_sft"], student_sft__steps=1, student_sft__sampling__refill=2)
    with pytest.raises(checkpoint.CheckpointError, match="different config.*stages.student_sft.sampling.refill"):
        pipelines.run(cfg, str(tmp_path))


def test_a_mid_stage_checkpoint_from_before_a_knob_existed_restores(tmp_path):
    """A stage interrupted under code without a knob resumes from its checkpoint under code
    with the knob off (the checkpoint's config fingerprint is the old stage config's)."""
    old = smoke_config(["student_sft"], student_sft__steps=2)
    with old.unlocked():
        del old.stages.student_sft["until_accuracy"]  # the code before the knob existed
    pipelines.run(old, str(tmp_path))
    for marker in (tmp_path / "models" / "student_sft" / runtime.DONE, tmp_path / "stages" / "student_sft" / "DONE.json"):
        os.remove(marker)  # interrupted after its last checkpoint
    assert checkpoint.StageCheckpoints(str(tmp_path), "student_sft").latest_step() == 2
    pipelines.run(smoke_config(["student_sft"], student_sft__steps=2), str(tmp_path))
    assert (tmp_path / "models" / "student_sft" / runtime.DONE).exists()


def test_rl_stage_raises_the_probability_of_correct_answers(tmp_path):
    """GRPO on 1-digit addition after a short SFT: the gold answers' log-probability rises.
    (40 RL steps: after 20 the rise was within the run-to-run noise of float rounding; a
    mathematically equal reshape of the decoder's matmuls turned +0.11 into -0.02.)"""
    from bridge import scoring
    from bridge.stages import sft

    cfg = smoke_config(["student_sft", "student_rl"], student_sft__steps=60, student_sft__batch_size=16,
                       student_sft__pool_prompts=22, student_rl__steps=40, student_rl__prompts_per_step=8,
                       student_rl__sampling__n=8)
    cfg.task.options.update(digits=1, num_train=22, num_test=5)
    cfg.stages.student_sft.optimizer.lr = 1e-2
    cfg.stages.student_rl.optimizer.lr = 1e-3
    pipelines.run(cfg, str(tmp_path))
    ctx = runtime.make_context(cfg, str(tmp_path))
    pool = sft.gold_pool(ctx, list(ctx.task.examples("train")))
    gold = {}
    for stage in ("student_sft", "student_rl"):
        logp = scoring.completion_logprobs(models.load_hf(str(tmp_path / "models" / stage)), pool)
        gold[stage] = float((np.asarray(logp) * pool["mask"]).sum(1).mean())
    assert gold["student_rl"] > gold["student_sft"] + 0.02, gold


def test_stage_task_options_override_the_run_task(tmp_path):
    from bridge.stages import sft

    cfg = smoke_config(["student_sft"], student_sft__task_options=common.cd(num_train=40), student_sft__pool_prompts=0)
    ctx = runtime.make_context(cfg, str(tmp_path))
    assert ctx.stage_task(cfg.stages.warmup) is ctx.task
    task = ctx.stage_task(cfg.stages.student_sft)
    assert len(task.examples("train")) == 40 and len(ctx.task.examples("train")) == 64
    assert [e.prompt for e in task.examples("test")] == [e.prompt for e in ctx.task.examples("test")]
    pool = sft.load_or_build_pool(ctx, runtime.Unit("student_sft"), cfg.stages.student_sft, None)
    assert len(pool["tokens"]) == 40


def test_sft_stops_when_held_out_accuracy_reaches_its_target(tmp_path, monkeypatch):
    """The stopping rule: accuracy on training examples held out of the pool every
    `check_every` steps (here a stand-in rising 0.1 per check); the stage ends at the first check
    at or above `until_accuracy` (the 4th, step 20), and a rerun on the finished workdir trains
    no further. The held-out examples are disjoint from the pool."""
    from bridge.stages import sft

    seen = []

    def rising(ctx, model, examples, scfg):
        seen.append(len(examples))
        return 0.1 * len(seen)

    monkeypatch.setattr(sft, "validation_accuracy", rising)
    cfg = smoke_config(["student_sft"], student_sft__steps=200, student_sft__batch_size=8,
                       student_sft__pool_prompts=0, student_sft__until_accuracy=0.35, student_sft__check_every=5,
                       student_sft__check_prompts=16)
    pipelines.run(cfg, str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    checks = [(r["step"], r["validation_accuracy"]) for r in records if "validation_accuracy" in r]
    np.testing.assert_allclose(checks, [(5, 0.1), (10, 0.2), (15, 0.3), (20, 0.4)])
    assert max(r["step"] for r in records if "loss" in r) == 20 and set(seen) == {16}
    assert checkpoint.StageCheckpoints(str(tmp_path), "student_sft").latest_step() == 20
    ctx = runtime.make_context(cfg, str(tmp_path / "check"))
    pool, held = sft.split_validation(ctx.stage_task(cfg.stages.student_sft), cfg.stages.student_sft)
    assert len(held) == 16 and not {e.prompt for e in held} & {e.prompt for e in pool}
    pipelines.run(cfg, str(tmp_path))  # finished: nothing more is trained
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(records)
