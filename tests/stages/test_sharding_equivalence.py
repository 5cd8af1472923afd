"""Every stage kind computes the same thing on any mesh: two steps of a smoke pipeline on 8 fake
devices split as (data, fsdp, tensor) = (2, 2, 2), (8, 1, 1) or (2, 4, 1) export the same
parameters and log the same metrics as on 1 device, within 1e-5 (absolute).

Each case is a smoke pipeline of the family config that defines the kind, cut to the stage(s)
of that kind, 2 steps each, no evaluation. The comparison covers every metric of every step
record except wall-clock time and device memory (`step_time_s`, `*_per_s`, `*_gib`), which
measure the machine, not the computation. Sampling stages sample on the mesh too, so the
rollouts themselves must come out equal for the metrics to match."""

import glob
import importlib
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from bridge import mesh as mesh_lib, runtime, stages

# case -> (family config module, variant, pipeline, the kinds it covers, stage overrides)
CASES = {
    "sft": ("configs.sparse_to_dense.toy", "smoke", ("warmup",), ("sft",), {}),
    "rl": ("configs.sparse_to_dense.toy", "smoke", ("student_rl",), ("rl",), {}),
    "opd": ("configs.sparse_to_dense.toy", "smoke", ("opd",), ("opd",), {}),
    # The distillation's s1 reward is whiten(log pi_T - log pi_old): after 2 teacher steps at the
    # smoke lr (1e-4; KL(pi_old || pi_T) 6e-6) the log-ratios are ~1e-3 against ~1e-7 rounding in
    # each log-prob, and whitening scales that rounding up to the advantages (1 vs 8 devices:
    # grad_norm 2e-5 apart, loss 4e-6). At lr 1e-2 (KL 0.03) the signal dominates: 8e-7, 5e-8.
    "erpd": ("configs.erpd.toy", "smoke", ("block:round",), ("erpd_teacher", "erpd_distill"),
             {"erpd_teacher": {"optimizer.lr": 1e-2}}),
    "self_distill": ("configs.self_distill.toy", "smoke", ("self_distill",), ("self_distill",), {}),
}
VOLATILE_SUFFIXES = ("_s", "_per_s", "_gib")  # timing and memory: the machine, not the computation
# (unit, step) -> metrics that are there a step function of a quantity that is 0 up to float
# rounding, so rounding (which differs between meshes) decides them: the ERPD teacher's first
# update scores the batch with the very weights that sampled it, so its implicit reward
# z = beta * sum_t (logp_t - old_logp_t) is 0 +- 1e-7 and the sign accuracy of z is noise.
ROUNDING_DECIDED = {("erpd_teacher@1", 1): {"implicit_reward_accuracy"}}
STEPS = 2


def test_every_registered_kind_has_a_case():
    assert {k for *_, kinds, _ in CASES.values() for k in kinds} == set(stages._registry())


def _config(case: str, shape: tuple):
    module, variant, pipeline, _, overrides = CASES[case]
    cfg = importlib.import_module(module).get_config(variant)
    with cfg.unlocked():
        cfg.pipeline.stages = pipeline
        cfg.mesh.shape = shape
        cfg.eval.num_prompts = 0  # no evaluation: the steps are what is compared
        cfg.metrics.update(plots=False, tensorboard=False, progress=False)
        for stage in cfg.stages.values():
            stage.steps = STEPS
        for stage, values in overrides.items():
            for key, value in values.items():
                *parents, last = key.split(".")
                node = cfg.stages[stage]
                for part in parents:
                    node = node[part]
                node[last] = value
    return cfg


def _run(case: str, shape: tuple, workdir) -> tuple[dict, dict]:
    """({unit: exported tensors}, {unit: step records without the volatile keys}) of the case
    on the first prod(shape) devices."""
    devices = jax.devices()[:int(np.prod(shape))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "make_mesh", lambda s: mesh_lib.make_mesh(s, devices=devices))
        runtime.run_pipeline(_config(case, shape), str(workdir))
    params = {}
    for folder in sorted(glob.glob(os.path.join(workdir, "models", "*"))):
        params[os.path.basename(folder)] = {k: v for path in sorted(glob.glob(os.path.join(folder, "*.safetensors")))
                                            for k, v in load_file(path).items()}
    records = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record.pop("stage"), []).append(
            {k: v for k, v in record.items() if not k.endswith(VOLATILE_SUFFIXES)})
    return params, records


_REFERENCE = {}


@pytest.fixture
def reference(tmp_path_factory):
    """The 1-device run of a case, computed once per test process."""
    def get(case):
        if case not in _REFERENCE:
            _REFERENCE[case] = _run(case, (1, 1, 1), tmp_path_factory.mktemp(f"{case}_1dev"))
        return _REFERENCE[case]
    return get


SLOW = pytest.mark.slow  # the pure data-parallel and data x fsdp splits; (2, 2, 2) uses all three axes


@pytest.mark.parametrize("shape", [(2, 2, 2), pytest.param((8, 1, 1), marks=SLOW), pytest.param((2, 4, 1), marks=SLOW)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(CASES))
def test_two_steps_on_8_devices_equal_1_device(case, shape, reference, tmp_path):
    one_params, one_records = reference(case)
    params, records = _run(case, shape, tmp_path)
    assert set(params) == set(one_params) and all(params.values())
    for unit in one_params:
        assert set(params[unit]) == set(one_params[unit]), unit
        for name, value in one_params[unit].items():
            np.testing.assert_allclose(params[unit][name], value, rtol=0, atol=1e-5, err_msg=f"{unit} {name}")
    assert set(records) == set(one_records)
    for unit, steps in one_records.items():
        assert len(records[unit]) == len(steps) == STEPS, unit
        for got, want in zip(records[unit], steps):
            assert set(got) == set(want), (unit, set(got) ^ set(want))
            for key, value in want.items():
                if key in ROUNDING_DECIDED.get((unit, want["step"]), ()):
                    continue
                np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-5,
                                           err_msg=f"{unit} step {want['step']} {key}")
