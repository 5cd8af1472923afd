"""One-step-off-policy rollouts and rollout/training sub-meshes in the rl stage
(`bridge.stages.off_policy`).

The reference for off_policy_lag=1 is the on-policy stage with its sampler handed, at step t,
the weights the trainer had one step earlier (host copies kept by a wrapper around
`rl.collect`): it samples batch t+1 with the params before update t, then applies update t+1,
in a plain loop without prefetching, copies or sub-meshes. The lagged stage must match it on
one shared mesh and with 4 rollout + 4 training devices; lag 0 must be unchanged."""

import dataclasses
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from bridge import runtime, sharding
from bridge.stages import off_policy, rl
from bridge.tasks.base import RewardResult
from stage_helpers import smoke_config

STEPS = 3
TIMING = ("sample_tokens_per_s", "train_tokens_per_s", "update_wait_s", "rollout_policy_lag")


def _context(workdir, **stage):
    """The smoke student_rl stage with a verifier a random model passes about half the time
    (the completion starts with a digit below 5), so groups have both rewards and the updates
    move the policy (lr 1e-2) enough for a step's lag to change the rollouts."""
    overrides = {f"student_rl__{k}": v for k, v in dict(steps=STEPS, tis_cap=2.0, **stage).items()}
    cfg = smoke_config(["student_rl"], **overrides)
    with cfg.unlocked():
        cfg.stages.student_rl.optimizer.lr = 1e-2
    ctx = runtime.make_context(cfg, str(workdir))
    ctx.task = dataclasses.replace(ctx.task, reward_fn=lambda text, e: RewardResult(
        float(text[:1] in "01234"), True, text))
    ctx.current = runtime.Unit("student_rl")
    return ctx, cfg.stages.student_rl


def _run(ctx, scfg):
    """(params on the host as a flat dict, each step's metrics, the program)."""
    program = rl.KIND.build(ctx, ctx.current, scfg)
    state, records = program.state, []
    with sharding.use_mesh(ctx.mesh, ctx.rules):
        for i in range(STEPS):
            state, metrics = program.step(state, i)
            records.append(metrics)
    params = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(jax.device_get(state.params))}
    return params, records, program


def _lagged_reference(monkeypatch):
    """rl.collect sampling at step t with the weights of step t - 1 (step 0: its own)."""
    collect, held = rl.collect, []

    def lagged(ctx, model, *args, **kw):
        graphdef, params = nnx.split(model)
        held.append(jax.tree.map(np.array, params))  # host copies: the update donates the buffers
        return collect(ctx, nnx.merge(graphdef, held[max(len(held) - 2, 0)]), *args, **kw)

    monkeypatch.setattr(rl, "collect", lagged)


def _assert_close(got, want, tol=1e-5):
    params, records = got
    want_params, want_records = want
    assert params.keys() == want_params.keys()
    for k in params:
        np.testing.assert_allclose(params[k], want_params[k], atol=tol, rtol=tol, err_msg=k)
    for step, (a, b) in enumerate(zip(records, want_records)):
        keys = set(b) - set(TIMING)
        assert keys <= set(a), keys - set(a)
        for k in sorted(keys):
            np.testing.assert_allclose(a[k], b[k], atol=tol, rtol=tol, err_msg=f"step {step}: {k}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The lagged reference and the on-policy stage, on the shared 8-device mesh."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _lagged_reference(monkeypatch)
        lagged = _run(*_context(tmp_path_factory.mktemp("reference")))[:2]
    on_policy = _run(*_context(tmp_path_factory.mktemp("on_policy")))[:2]
    return lagged, on_policy


def test_lag_one_on_a_shared_mesh_equals_the_lagged_reference(tmp_path, reference):
    lagged, on_policy = reference
    got = _run(*_context(tmp_path, off_policy_lag=1))
    _assert_close(got[:2], lagged)
    records = got[1]
    assert [r["rollout_policy_lag"] for r in records] == [0.0, 1.0, 1.0]
    # the lag is real: steps 1 and 2 sample with older weights than the trainer scores with
    assert records[0]["sampler_trainer_logp_gap"] < 1e-5
    assert min(r["sampler_trainer_logp_gap"] for r in records[1:]) > 1e-3
    assert max(np.abs(got[0][k] - on_policy[0][k]).max() for k in on_policy[0]) > 1e-4


def test_lag_one_on_4_rollout_and_4_training_devices_equals_the_lagged_reference(tmp_path, reference, monkeypatch):
    """Trained on devices 4-7, sampled on devices 0-3 with copies of the weights, no compilation
    after the first step."""
    from bridge import sampling

    placed, generate = [], sampling.generate

    def spy(model, *args, mesh=None, **kw):
        placed.append(({d.id for d in mesh.devices.flat},
                       {d.id for x in jax.tree.leaves(nnx.state(model)) for d in x.devices()}))
        return generate(model, *args, mesh=mesh, **kw)

    monkeypatch.setattr(sampling, "generate", spy)
    ctx, scfg = _context(tmp_path, off_policy_lag=1, rollout_devices=4)
    program = rl.KIND.build(ctx, ctx.current, scfg)
    assert {d.id for x in jax.tree.leaves(program.state) for d in x.devices()} == {4, 5, 6, 7}
    compiles = _CompileLog()
    state, records = program.state, []
    with sharding.use_mesh(ctx.mesh, ctx.rules):
        for i in range(STEPS):
            if i == 1:
                logging.getLogger("jax").addHandler(compiles)
            with jax.log_compiles(i >= 1):
                state, metrics = program.step(state, i)
            records.append(metrics)
    logging.getLogger("jax").removeHandler(compiles)
    params = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(jax.device_get(state.params))}
    _assert_close((params, records), reference[0])
    assert placed and all(p == ({0, 1, 2, 3}, {0, 1, 2, 3}) for p in placed), placed
    assert compiles.names == [], compiles.names


def test_lag_zero_is_the_on_policy_stage_bit_for_bit(tmp_path, reference):
    """The knobs absent (a config written before they existed) and at 0 give today's stage."""
    _, on_policy = reference
    ctx, scfg = _context(tmp_path)
    with scfg.unlocked():
        del scfg["off_policy_lag"], scfg["rollout_devices"]
    params, records, _ = _run(ctx, scfg)
    for k in params:
        np.testing.assert_array_equal(params[k], on_policy[0][k], err_msg=k)
    for got, want in zip(records, on_policy[1]):
        assert {k: v for k, v in got.items() if k not in TIMING} == {k: v for k, v in want.items() if k not in TIMING}


def test_lag_zero_on_4_rollout_and_4_training_devices_equals_the_shared_mesh(tmp_path, reference):
    """On policy with the devices split: sampled on 0-3 with a copy, trained on 4-7, same run."""
    got = _run(*_context(tmp_path, rollout_devices=4))
    _assert_close(got[:2], reference[1])
    assert {d.id for x in jax.tree.leaves(got[2].state) for d in x.sharding.device_set} == {4, 5, 6, 7}


def test_lookahead_saves_the_stream_before_the_rollout_sampled_ahead():
    """A checkpoint after step t holds the prompt stream after batch t, not after t + 1, so a
    resumed run draws batch t + 1 again."""
    class Stream:
        def __init__(self):
            self.position = 0

        def __next__(self):
            self.position += 1
            return self.position

        def get_state(self):
            return self.position

        def set_state(self, state):
            self.position = state

    data = off_policy.Lookahead(Stream())
    assert data.take(0) is None and next(data) == 1  # the first step samples its own batch
    data.ahead(1, lambda: next(data))
    assert data.get_state() == 1  # saved after step 0: batch 1 not drawn yet
    assert data.take(1) == 2 and data.get_state() == 2
    data.ahead(2, lambda: next(data))
    data.set_state(data.get_state())  # a resume after step 1
    assert data.take(2) is None and next(data) == 3


def test_bad_settings_are_named(tmp_path):
    ctx, scfg = _context(tmp_path, off_policy_lag=2)
    with pytest.raises(ValueError, match="off_policy_lag must be 0"):
        rl.KIND.build(ctx, ctx.current, scfg)
    with scfg.unlocked():
        scfg.off_policy_lag, scfg.rollout_devices = 1, 8
    with pytest.raises(ValueError, match="rollout_devices=8 must leave devices to train on"):
        rl.KIND.build(ctx, ctx.current, scfg)


class _CompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling "):
            self.names.append(record.getMessage().split(" with ")[0])
