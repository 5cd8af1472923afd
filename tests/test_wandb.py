"""Weights & Biases logging (`metrics.wandb_project`), offline: a smoke pipeline killed after its
first stage and resumed logs both stages' metrics to one W&B run, its id kept in the workdir.

The offline runs are read back from W&B's own transaction logs (<workdir>/wandb/offline-run-*/
run-<id>.wandb: LevelDB log framing around `wandb_internal_pb2.Record` protobufs), not from
anything bridge writes."""

import glob
import json
import os
import struct

import pytest
from wandb.proto import wandb_internal_pb2  # the `test` extra installs wandb

from bridge import pipelines, runtime
from stage_helpers import smoke_config

_BLOCK, _HEADER = 32768, 7  # LevelDB log: 32 KiB blocks, 7-byte record headers (crc, length, type)


def _records(path: str) -> list:
    """Every record of a .wandb transaction log (":W&B" + magic + version, then LevelDB log
    records: type 1 full, 2 first, 3 middle, 4 last fragment)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    out, pending, pos = [], b"", 7
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _offline_runs(workdir) -> list[tuple[str, list[dict]]]:
    """(run id, logged history rows) of each offline W&B run in `workdir`, oldest first."""
    runs = []
    for folder in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))):
        (log,) = glob.glob(os.path.join(folder, "run-*.wandb"))
        records = _records(log)
        (run_id,) = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
        rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                for r in records if r.WhichOneof("record_type") == "history"]
        runs.append((run_id, rows))
    return runs


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, monkeypatch):
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb_dir",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
        monkeypatch.setenv(var, str(value))
    workdir = tmp_path / "run"
    cfg = smoke_config(["student_sft", "student_rl"], student_sft__steps=2, student_rl__steps=2)
    with cfg.unlocked():
        cfg.metrics.wandb_project = "bridge-test"
    run_stage = runtime.run_stage

    def killed_before_rl(ctx, unit, *args, **kw):
        if unit.stage == "student_rl":
            raise KeyboardInterrupt
        return run_stage(ctx, unit, *args, **kw)

    monkeypatch.setattr(runtime, "run_stage", killed_before_rl)
    with pytest.raises(KeyboardInterrupt):
        pipelines.run(cfg, str(workdir))
    run_id = (workdir / "wandb_run_id").read_text().strip()
    monkeypatch.setattr(runtime, "run_stage", run_stage)
    pipelines.run(cfg, str(workdir))
    assert (workdir / "wandb_run_id").read_text().strip() == run_id

    runs = _offline_runs(workdir)
    assert [rid for rid, _ in runs] == [run_id, run_id]  # the first start and the resume
    (_, first), (_, resumed) = runs
    logged = {}
    for rows in (first, resumed):
        for row in rows:
            for key, value in row.items():
                logged.setdefault(key, []).append(value)
    expected = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "stage":
                expected.setdefault(f"{record['stage']}/{key}", []).append(value)
    assert {k for row in first for k in row} >= {"student_sft/loss", "student_sft/step"}
    assert not any(k.startswith("student_rl/") for row in first for k in row)
    assert {k for row in resumed for k in row} >= {"student_rl/loss", "student_rl/reward", "student_rl/step"}
    for key, values in expected.items():  # every metrics.jsonl value, in order, under <stage>/<key>
        assert logged[key] == pytest.approx(values, rel=1e-6), key
