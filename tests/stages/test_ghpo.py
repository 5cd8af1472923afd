"""GHPO's adaptive guidance in the rl stage: the escalation on a hand case (a stub sampler, the
expected groups, prefixes and metrics written out by hand), guided prompts and rewards through
the real sampler, the batch an rl step trains on (guided prompt, old logprobs of it) for GRPO
and PPO, the config checks, and a learning run where the fraction of groups needing guidance
falls."""

import dataclasses
import json
import types

import jax
import numpy as np
import pytest
from flax import nnx

from bridge import runtime
from bridge.stages import common as stage_common, rl
from bridge.tasks import arithmetic
from bridge.tasks.base import Example, RewardResult, Task
from configs import common
from configs.self_distill import toy
from stage_helpers import reference_logp

N = 4  # samples per prompt in the hand case

# The hand case: six groups of 4 samples. Correct samples per (example, prefix) as the stub
# sampler returns them; "" is the unguided draw.
SOLVED_AT = {
    ("a", ""): 2,                                       # solvable: untouched
    ("b", ""): 0, ("b", "ab"): 1,                        # solved at 0.25
    ("c", ""): 0, ("c", "ab"): 0, ("c", "abcd"): 3,      # solved at 0.5
    ("d", ""): 0, ("d", "ab"): 0, ("d", "abcd"): 0, ("d", "abcdef"): 0,  # never
    ("e", ""): 0,                                       # no reference solution: unguidable
    ("f", ""): 4,                                       # all correct: untouched
}


def _hand_task():
    def reward(text, example):
        return RewardResult(float(text == example.answer), True, text)
    return Task(name="hand", load_split=lambda split: [], reward_fn=reward)


def _example(name):
    return Example(id=name, prompt=f"{name}?", answer="x", solution=None if name == "e" else "abcdefgh")


def _stub_sampler(calls):
    """A `common.sample_rollout` whose correct counts follow SOLVED_AT; row r of call k carries
    token 1000 * k + r, so each row's origin can be read back."""
    def sample(ctx, model, examples, sc, *, seed, chunk_prompts=0, prefixes=None):
        prefixes = list(prefixes) if prefixes is not None else [""] * len(examples)
        k = len(calls)
        calls.append({"ids": [e.id for e in examples], "prefixes": prefixes, "seed": seed})
        rows = len(examples) * N
        correct = np.concatenate([np.arange(N) < SOLVED_AT[(e.id, p)] for e, p in zip(examples, prefixes)])
        return stage_common.Rollout(
            prompt_tokens=np.full((rows, 3), 7, np.int32), prompt_mask=np.ones((rows, 3), bool),
            tokens=(1000 * k + np.arange(rows, dtype=np.int32))[:, None].repeat(2, 1),
            mask=np.ones((rows, 2), bool), sample_logp=np.zeros((rows, 2), np.float32),
            lengths=np.full(rows, 2, np.int32), truncated=np.zeros(rows, bool),
            rewards=correct.astype(np.float32), format_ok=np.ones(rows, np.float32),
            texts=("",) * rows, examples=tuple(e for e in examples for _ in range(N)))
    return sample


def test_unsolved_groups_are_guided_with_a_growing_prefix_and_counted(monkeypatch):
    calls = []
    monkeypatch.setattr(stage_common, "sample_rollout", _stub_sampler(calls))
    ctx = types.SimpleNamespace(task=_hand_task())
    scfg = common.rl_stage("student", 1e-3, 1, sampling=common.sampling(N),
                           guidance=common.cd(enabled=True, fractions=(0.25, 0.5, 0.75)))
    examples = [_example(x) for x in "abcdef"]
    plain = stage_common.sample_rollout(ctx, None, examples, scfg.sampling, seed=0)
    stats = rl.GuidanceStats(scfg.guidance.fractions)
    out = rl.guide(ctx, None, plain, scfg, lambda level: 100 + level, stats)

    # The unsolved groups with a solution are sampled again, each level with the groups still
    # unsolved (padded to a power of two with the last one), after the first 25/50/75% of the
    # 8-character solution; seeds per level.
    assert [c["ids"] for c in calls[1:]] == [["b", "c", "d", "d"], ["c", "d"], ["d"]]
    assert [c["prefixes"] for c in calls[1:]] == [["ab"] * 4, ["abcd"] * 2, ["abcdef"]]
    assert [c["seed"] for c in calls[1:]] == [100, 101, 102]
    # Rows: a, e, f from the plain draw (call 0), b from level 0 (call 1, its group 0), c from
    # level 1 (call 2, group 0), d from level 2 (call 3, group 0); order kept.
    origin = {"a": (0, 0), "b": (1, 0), "c": (2, 0), "d": (3, 0), "e": (0, 4), "f": (0, 5)}
    want = np.concatenate([1000 * origin[x][0] + origin[x][1] * N + np.arange(N) for x in "abcdef"])
    np.testing.assert_array_equal(out.tokens[:, 0], want)
    np.testing.assert_array_equal(out.rewards, np.concatenate(
        [np.arange(N) < c for c in (2, 1, 3, 0, 0, 4)]).astype(np.float32))
    assert [e.id for e in out.examples] == [x for x in "abcdef" for _ in range(N)]
    for x in "aef":  # untouched groups: every array of the plain draw
        g = "abcdef".index(x)
        for key in ("tokens", "rewards", "prompt_tokens", "mask"):
            np.testing.assert_array_equal(getattr(out, key)[g * N:(g + 1) * N], getattr(plain, key)[g * N:(g + 1) * N])

    m = stats.metrics()
    assert m["guidance_fired_frac"] == pytest.approx(4 / 6)  # b, c, d, e
    assert m["guidance_unguidable_frac"] == pytest.approx(1 / 6)  # e
    assert m["guidance_fraction_mean"] == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    assert m["guidance_solved_frac"] == pytest.approx(2 / 3)  # b, c of b, c, d
    assert m["guidance_accuracy"] == pytest.approx((1 + 3 + 0) / 12)
    assert m["accuracy_unguided"] == pytest.approx((2 + 4) / 24)
    assert (m["guidance_f25_groups"], m["guidance_f50_groups"], m["guidance_f75_groups"]) == (3, 2, 1)
    assert m["guidance_f25_accuracy"] == pytest.approx(1 / 12)
    assert m["guidance_f50_accuracy"] == pytest.approx(3 / 8)
    assert m["guidance_f75_accuracy"] == 0.0


def test_a_batch_with_every_group_solved_samples_nothing_more(monkeypatch):
    calls = []
    monkeypatch.setattr(stage_common, "sample_rollout", _stub_sampler(calls))
    ctx = types.SimpleNamespace(task=_hand_task())
    scfg = common.rl_stage("student", 1e-3, 1, sampling=common.sampling(N), guidance=common.cd(enabled=True))
    plain = stage_common.sample_rollout(ctx, None, [_example("a"), _example("f")], scfg.sampling, seed=0)
    stats = rl.GuidanceStats(scfg.guidance.fractions)
    out = rl.guide(ctx, None, plain, scfg, lambda level: level, stats)
    assert len(calls) == 1
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    m = stats.metrics()
    assert m["guidance_fired_frac"] == 0 and m["guidance_f25_groups"] == 0 and m["accuracy_unguided"] == 0.75


def test_guidance_config_checks():
    task = arithmetic.arithmetic_task(digits=2, num_train=4, num_test=4)
    for bad in ((0.5, 0.25), (0.0, 0.5), (0.5, 1.5), ()):
        scfg = common.rl_stage("student", 1e-3, 1, guidance=common.cd(enabled=True, fractions=bad))
        with pytest.raises(ValueError, match="increasing fractions"):
            rl.check_guidance("student_rl", scfg, task)
    scfg = common.rl_stage("student", 1e-3, 1, guidance=common.cd(enabled=True))
    rl.check_guidance("student_rl", scfg, task)
    bare = Task(name="bare", load_split=lambda split: [Example("0", "1+1=", "2")], reward_fn=None)
    with pytest.raises(ValueError, match="no training example of task 'bare'"):
        rl.check_guidance("student_rl", scfg, bare)


# ---- the real sampler and the rl step --------------------------------------------------------


def _smoke(tmp_path, **stage):
    cfg = toy.get_config("grpo,smoke")
    with cfg.unlocked():
        cfg.stages.student_rl.guidance.enabled = True
        cfg.stages.student_rl.update(stage)
        cfg.metrics.plots = False
    ctx = runtime.make_context(cfg, str(tmp_path))
    unit = runtime.Unit("student_rl")
    ctx.current = unit
    return ctx, unit, cfg.stages.student_rl


def _unpadded(tokens, mask):
    return [list(t[m]) for t, m in zip(np.asarray(tokens), np.asarray(mask))]


def test_guided_prompts_continue_the_prompt_and_the_verifier_reads_prefix_and_continuation(tmp_path):
    """The real sampler on a random tiny model, with a verifier that accepts any text starting
    with the solution: a group whose prefix is the whole solution is correct whatever the model
    writes (the verifier reads prefix + continuation), the unguided group is not."""
    ctx, _, scfg = _smoke(tmp_path)
    ctx.task = dataclasses.replace(ctx.task, reward_fn=lambda text, e: RewardResult(
        float(text.startswith(e.solution)), True, text))
    examples = list(ctx.task.examples("train"))[:3]
    prefixes = ["", examples[1].solution[:2], examples[2].solution]
    model = ctx.model("student")
    roll = stage_common.sample_rollout(ctx, model, examples, scfg.sampling, seed=3, prefixes=prefixes)
    n = scfg.sampling.n
    vocab = ctx.tokenizer.get_vocab()
    for r, prompt in enumerate(_unpadded(roll.prompt_tokens, roll.prompt_mask)):
        e, p = examples[r // n], prefixes[r // n]
        assert prompt == [vocab[ch] for ch in e.prompt + p]  # one token per character
        assert roll.rewards[r] == float((p + roll.texts[r]).startswith(e.solution))
    assert roll.correct[2 * n:].all() and not roll.correct[:n].any()


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_an_rl_step_trains_on_the_guided_prompt(tmp_path, monkeypatch, advantage):
    """A random policy solves nothing, so every group ends guided at 0.75; the batch of the
    update holds prompt + prefix and the old logprobs of the continuation given it
    (materialized logits, `stage_helpers.reference_logp`)."""
    extra = dict(advantage="gae", loss="ppo") if advantage == "gae" else {}
    ctx, unit, scfg = _smoke(tmp_path, steps=1, **extra)
    seen = {}
    collect, run_updates = rl.collect, stage_common.run_updates

    def spy_collect(*args, **kw):
        seen["roll"], weight = collect(*args, **kw)
        return seen["roll"], weight

    def spy_updates(trainer, state, batch, *args, **kw):
        seen["batch"] = {k: np.asarray(v) for k, v in batch.items()}
        graphdef, params = nnx.split(stage_common.current_model(trainer, state))
        seen["policy"] = nnx.merge(graphdef, jax.tree.map(np.array, params))  # the update donates the state
        return run_updates(trainer, state, batch, *args, **kw)

    monkeypatch.setattr(rl, "collect", spy_collect)
    monkeypatch.setattr(stage_common, "run_updates", spy_updates)
    program = rl.KIND.build(ctx, unit, scfg)
    with runtime.sharding.use_mesh(ctx.mesh, ctx.rules):
        _, metrics = program.step(program.state, 0)
    roll, batch = seen["roll"], seen["batch"]
    assert metrics["guidance_fired_frac"] == 1.0 and metrics["accuracy_unguided"] == 0.0
    assert metrics["guidance_fraction_mean"] == 0.75 and metrics["guidance_f75_groups"] == scfg.prompts_per_step
    vocab = ctx.tokenizer.get_vocab()
    for r, prompt in enumerate(_unpadded(batch["prompt_tokens"], batch["prompt_mask"])):
        e = roll.examples[r]
        assert prompt == [vocab[ch] for ch in e.prompt + ctx.task.guidance(e, 0.75)]
        assert len(ctx.task.guidance(e, 0.75)) == round(0.75 * len(e.solution))
    _, want = reference_logp(seen["policy"], batch)
    np.testing.assert_allclose(batch["old_logp"] * batch["mask"], want * batch["mask"], atol=1e-5)


# ---- learning ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_fraction_of_groups_needing_guidance_falls(tmp_path):
    """2-digit addition: a small model after SFT to 20% held-out accuracy, then GRPO + guidance
    on 8 fixed prompts (lr 2e-3, 12 steps). Measured: 0.75 of the groups needed guidance in
    step 1, 0.25-0.375 from step 9; the unguided accuracy went from 0.03 to 0.4."""
    c = common.base()
    c.tokenizer = "char:0123456789+="
    c.task = common.cd(name="arithmetic", options=common.cd(digits=2, op="+", num_train=8, num_test=16, seed=0))
    c.models.student = common.cd(hf_dir="", arch=common.cd(
        family="qwen3", qk_norm=True, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=64,
        hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16))
    c.stages.student_sft = common.sft_stage(
        "student", 3e-3, 400, source="gold", loss="cross_entropy", batch_size=64,
        task_options=common.cd(num_train=2400), until_accuracy=0.2, check_every=10, check_prompts=128,
        sampling=common.sampling(1, max_new_tokens=4))
    c.stages.student_rl = common.rl_stage("student", 2e-3, 12, prompts_per_step=8,
                                          sampling=common.sampling(8, max_new_tokens=4),
                                          guidance=common.cd(enabled=True, fractions=(0.25, 0.5, 0.75)))
    c.pipeline.stages = ("student_sft", "student_rl")
    c.eval.update(num_prompts=16, batch_size=16, max_new_tokens=4)
    c.metrics.update(progress=False, tensorboard=False, plots=False)
    runtime.run_pipeline(c, str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl_steps = [r for r in records if r["stage"] == "student_rl" and "guidance_fired_frac" in r]
    fired = [r["guidance_fired_frac"] for r in rl_steps]
    accuracy = [r["accuracy_unguided"] for r in rl_steps]
    assert len(fired) == 12
    assert np.mean(fired[-3:]) <= np.mean(fired[:3]) - 0.2, fired
    assert np.mean(accuracy[-3:]) > np.mean(accuracy[:3]) + 0.1, accuracy
    # Guidance made unsolved groups informative: some guided group had a correct sample.
    assert max(r["guidance_solved_frac"] for r in rl_steps) > 0
