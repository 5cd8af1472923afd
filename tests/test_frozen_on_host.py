"""`system.frozen_on_host`: a stage's frozen models live in pinned host memory between steps
and are copied to device memory for the step that reads them (bridge/offload.py).

For an OPD stage (the teacher slot, read inside the update by a full-vocabulary loss) and an rl
stage with a KL reference in the loss (the stage's own copy of the initial policy), the same
smoke run with the option on and off: between steps no device copy of the frozen model is
alive (counted over `jax.live_arrays`, against the option-off run), the exported weights and
logged metrics agree within 1e-6, and nothing compiles after the first step."""

import dataclasses
import gc
import json
import logging
from collections import Counter

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from bridge import runtime
from bridge.stages import opd, rl
from stage_helpers import smoke_config

TIMING = ("step_time_s", "sample_tokens_per_s", "train_tokens_per_s", "host_peak_rss_gib")


def _shapes(module) -> Counter:
    return Counter((x.shape, x.dtype) for x in jax.tree.leaves(nnx.state(module)))


def _live(kind: str, shapes: Counter) -> int:
    """Live arrays in memory `kind` with a parameter's shape and dtype."""
    return sum(1 for x in jax.live_arrays() if x.sharding.memory_kind == kind and (x.shape, x.dtype) in shapes)


class _Compiles(logging.Handler):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def emit(self, record):
        if record.getMessage().startswith("Compiling "):
            self.events.append(record.getMessage().split(" with ")[0])


def _run(tmp_path, monkeypatch, module, stage, frozen_slot, on, **overrides):
    """One smoke run of `stage`; returns (exported tensors, step records, memory observed after
    each step, programs compiled after the first step). After each step: the live arrays shaped
    like `frozen_slot`'s parameters in device and in host memory, its parameter count, and
    whether the slot's own parameters are all in host memory."""
    cfg = smoke_config([stage], **{f"{stage}__{k}": v for k, v in overrides.items()})
    with cfg.unlocked():
        cfg.system.frozen_on_host = on
        cfg.eval.num_prompts = 0
    seen, compiles = [], []
    build = module.loop
    gc.collect()  # earlier runs' arrays are gone before this run counts its own

    def loop(ctx, unit, scfg, kind):
        program = build(ctx, unit, scfg, kind)
        shapes = _shapes(ctx.model(frozen_slot))
        first = program.step

        def step(state, i):
            out = first(state, i)
            jax.block_until_ready(out)
            slot = ctx.slots[frozen_slot]
            seen.append((_live("device", shapes), _live("pinned_host", shapes), sum(shapes.values()),
                         all(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(nnx.state(slot)))))
            if i == 0:
                logging.getLogger("jax").addHandler(handler)
            return out

        return dataclasses.replace(program, step=step)

    monkeypatch.setattr(module, "KIND", dataclasses.replace(module.KIND, loop=loop))
    handler = _Compiles(compiles)
    workdir = tmp_path / ("on" if on else "off")
    try:
        with jax.log_compiles(True):
            runtime.run_pipeline(cfg, str(workdir))
    finally:
        logging.getLogger("jax").removeHandler(handler)
    records = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["stage"] == stage]
    return load_file(str(workdir / "models" / stage / "model.safetensors")), records, seen, compiles


def _same_run(off, on):
    weights_off, records_off, _, _ = off
    weights_on, records_on, _, compiles = on
    assert sorted(weights_off) == sorted(weights_on)
    for name in weights_off:
        np.testing.assert_allclose(weights_on[name], weights_off[name], rtol=0, atol=1e-6, err_msg=name)
    assert len(records_on) == len(records_off) == 3
    for a, b in zip(records_off, records_on):
        keys = [k for k in a if k not in TIMING and not k.startswith("device_") and isinstance(a[k], float)]
        assert keys and set(keys) <= set(b)
        np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=0, atol=1e-6)
    # nothing compiles after the first step but orbax's slices at the first checkpoint save
    assert [c for c in compiles if c != "Compiling jit(slice)"] == []


def test_opd_teacher_on_host_between_steps(tmp_path, monkeypatch):
    kw = dict(loss="reverse_kl")  # the teacher is read by scoring and by every update
    off = _run(tmp_path, monkeypatch, opd, "opd", "teacher", False, **kw)
    on = _run(tmp_path, monkeypatch, opd, "opd", "teacher", True, **kw)
    assert len(off[2]) == len(on[2]) == 3
    for (device_off, host_off, leaves, slot_off), (device_on, host_on, _, slot_on) in zip(off[2], on[2]):
        assert host_off == 0 and not slot_off  # off: the teacher slot stays in device memory
        # on: the slot's arrays in host memory and no device copy of them alive between steps
        assert slot_on and host_on == leaves and device_off - device_on == leaves
    _same_run(off, on)


def test_rl_kl_reference_on_host_between_steps(tmp_path, monkeypatch):
    kw = dict(kl_coef=0.05, kl_kind="k3", kl_mode="loss")
    off = _run(tmp_path, monkeypatch, rl, "student_rl", "student", False, **kw)
    on = _run(tmp_path, monkeypatch, rl, "student_rl", "student", True, **kw)
    assert len(off[2]) == len(on[2]) == 3
    for (device_off, host_off, leaves, _), (device_on, host_on, _, slot_on) in zip(off[2], on[2]):
        # the reference copy moved from device memory to host memory; the policy slot stays
        assert host_off == 0 and host_on == leaves and device_off - device_on == leaves and not slot_on
    _same_run(off, on)
