"""Every stage's programs compile in its first step and never again: a compilation logged
between a unit's first and last step record (its evaluation after the last step excluded) fails
the test, naming the unit and the program. One smoke pipeline per family covers every stage kind
(sft, rl, opd; erpd_teacher, erpd_distill; self_distill). Checkpoint writes are outside the
check: on a multi-device mesh orbax slices each replicated array on the host side with one
small `jit(slice)` per array shape, at a stage's first save."""

import importlib
import logging

import jax
import pytest

from bridge import checkpoint, metrics as metrics_lib, runtime


class _Compiles(logging.Handler):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.events.append(("compile", message.split(" with ")[0]))


@pytest.mark.parametrize("module,arg", [("configs.sparse_to_dense.toy", "smoke"), ("configs.erpd.toy", "smoke"),
                                        ("configs.self_distill.toy", "smoke,srpo")])
def test_no_compilation_after_the_first_step_of_a_stage(tmp_path, monkeypatch, module, arg):
    events = []
    write = metrics_lib.MetricsWriter.write

    def recorded(self, unit, step, metrics, **kw):
        if not kw.get("replace"):  # the evaluation's record is written after the steps
            events.append(("step", unit, step))
        return write(self, unit, step, metrics, **kw)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", recorded)
    save = checkpoint.StageCheckpoints.save

    def saving(self, *args, **kw):
        events.append(("save", True))
        try:
            return save(self, *args, **kw)
        finally:
            events.append(("save", False))

    monkeypatch.setattr(checkpoint.StageCheckpoints, "save", saving)
    handler = _Compiles(events)
    logging.getLogger("jax").addHandler(handler)
    cfg = importlib.import_module(module).get_config(arg)
    cfg.unlock()
    cfg.metrics.plots = False
    cfg.lock()
    try:
        with jax.log_compiles(True):
            runtime.run_pipeline(cfg, str(tmp_path))
    finally:
        logging.getLogger("jax").removeHandler(handler)
    first, last, in_save = {}, {}, False
    for i, event in enumerate(events):
        if event[0] == "save":
            in_save = event[1]
        elif event[0] == "compile" and in_save:
            events[i] = ("checkpoint", event[1])
        elif event[0] == "step":
            first.setdefault(event[1], i)
            last[event[1]] = i
    assert len(first) == len(runtime.pipeline_units(cfg))
    late = {unit: [events[i][1] for i in range(first[unit], last[unit]) if events[i][0] == "compile"]
            for unit in first if last[unit] > first[unit]}
    assert all(late[u] == [] for u in late), {u: c for u, c in late.items() if c}
    assert all(last[u] > first[u] for u in first)  # every stage ran more than one step
