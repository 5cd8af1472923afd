"""The training runtime every stage runs on: model slots, the stage loop, checkpoints, resume.

A pipeline is an ordered list of stages. Each stage trains one model *slot* ("teacher",
"student", ...) and may read others. A stage module exposes

    build(ctx, name, cfg) -> StageProgram(graphdef, state, step, data)

where `step(state, i) -> (state, metrics)` does one stage step (rollouts, scoring, one or
more jitted updates). `run_stage` owns everything around it: resume from the latest
checkpoint (state + data-iterator state), metrics, checkpoints every N steps and at the end,
the non-finite guard, export of the final weights as a Hugging Face folder, and the
pipeline cursor. New stages (ERPD, self-distillation) plug in by adding a module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from bridge import checkpoint, metrics as metrics_lib, models, sharding
from bridge.mesh import make_mesh

DONE = "STAGE_DONE"


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates; the last good checkpoint is intact."""


@dataclasses.dataclass
class StageProgram:
    graphdef: Any
    state: Any  # TrainState
    step: Callable  # (state, step_index) -> (state, metrics)
    data: Any = None  # iterator with get_state() / set_state(); saved in checkpoints
    slot: str = "student"


@dataclasses.dataclass
class Context:
    """What stages share: config, workdir, mesh, tokenizer, task, metrics, current models."""

    cfg: Any
    workdir: str
    mesh: Any
    rules: tuple
    tokenizer: Any
    task: Any
    writer: metrics_lib.MetricsWriter
    slots: dict = dataclasses.field(default_factory=dict)
    results: dict = dataclasses.field(default_factory=dict)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return models.eos_ids(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return models.pad_id(self.tokenizer)

    def stage_rng(self, stage: str, step: int) -> jax.Array:
        """Randomness of one stage step: a function of (seed, stage name, step) only."""
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), zlib.crc32(stage.encode()))
        return jax.random.fold_in(key, step)

    def stage_task(self, scfg):
        """The run's task, or the same task with the stage's `task_options` overriding its
        options (e.g. a larger training split for supervised pretraining)."""
        overrides = scfg.get("task_options")
        if not overrides or not overrides.to_dict():
            return self.task
        from bridge import tasks

        return tasks.get_task(self.cfg.task.name, **{**self.cfg.task.options.to_dict(), **overrides.to_dict()})

    def prompts(self, stage: str, batch_size: int):
        """The stage's shuffled, checkpointable stream of training prompt batches."""
        from bridge import data

        return data.make_prompt_iterator(self.task, self.tokenizer, "train", batch_size,
                                         seed=int(self.cfg.seed) + zlib.crc32(stage.encode()) % 10_000,
                                         pad_id=self.pad_id)

    def load(self, path: str):
        dtype = self.cfg.get("dtype", "float32")
        return models.load_hf(path, dtype=dtype, param_dtype=self.cfg.get("param_dtype", dtype),
                              mesh=self.mesh, rules=self.rules, remat=bool(self.cfg.get("remat", False)),
                              scan_layers=bool(self.cfg.get("scan_layers", False)))

    def model(self, ref: str):
        """A model by reference: a slot name ("teacher"), "stage:<name>" or "hf:<path>"."""
        if ref.startswith("hf:"):
            return self.load(ref[3:])
        if ref.startswith("stage:"):
            path = os.path.join(self.workdir, "models", ref[6:])
            if not os.path.exists(os.path.join(path, DONE)):
                raise ValueError(f"Model reference {ref!r}: stage {ref[6:]!r} has not finished "
                                 f"(no {DONE} in {path}); order the stages so it runs first.")
            return self.load(path)
        if ref not in self.slots:
            self.slots[ref] = self._initial_model(ref)
        return self.slots[ref]

    def _initial_model(self, slot: str):
        """A slot's starting weights: its `hf_dir`, or a seeded random init of its `arch`,
        saved once under <workdir>/models/init_<slot> so resumed runs start identically."""
        if slot not in self.cfg.models:
            raise ValueError(f"Unknown model slot {slot!r}; config.models defines {sorted(self.cfg.models)}.")
        mcfg = self.cfg.models[slot]
        if mcfg.get("hf_dir"):
            if os.path.exists(os.path.join(mcfg.hf_dir, "tokenizer.json")):
                models.check_same_vocabulary(self.tokenizer, models.load_tokenizer(mcfg.hf_dir), what=slot)
            return self.load(mcfg.hf_dir)
        path = os.path.join(self.workdir, "models", f"init_{slot}")
        if not os.path.exists(os.path.join(path, DONE)):
            arch = dict(mcfg.arch)
            arch.setdefault("vocab_size", len(self.tokenizer))
            arch.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            arch.setdefault("bos_token_id", self.tokenizer.bos_token_id)
            cfg = models.ModelConfig(**arch)
            seed = zlib.crc32(slot.encode()) + int(self.cfg.seed)
            model = models.Decoder(cfg, rngs=nnx.Rngs(seed))
            models.save_hf(model, path, tokenizer=self.tokenizer)
            open(os.path.join(path, DONE), "w").close()
        return self.load(path)


def make_context(cfg, workdir: str) -> Context:
    """Builds mesh, tokenizer, task and metrics writer from the config; checks the workdir."""
    from bridge import tasks  # heavy imports only when a run starts

    os.makedirs(workdir, exist_ok=True)
    _check_workdir_config(cfg, workdir)
    mesh = make_mesh(tuple(cfg.mesh.shape))
    rules = sharding.as_rules(cfg.mesh.rules)
    tokenizer = _tokenizer(cfg.tokenizer)
    task = tasks.get_task(cfg.task.name, **cfg.task.options.to_dict())
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=cfg.metrics.tensorboard,
                                       wandb_project=cfg.metrics.get("wandb_project") or None)
    return Context(cfg=cfg, workdir=workdir, mesh=mesh, rules=rules or sharding.DEFAULT_RULES,
                   tokenizer=tokenizer, task=task, writer=writer)


def _tokenizer(spec: str):
    if spec.startswith("char:"):
        return models.char_tokenizer(spec[5:])
    return models.load_tokenizer(spec)


def _check_workdir_config(cfg, workdir: str) -> None:
    """A workdir belongs to one experiment: refuse to resume under a different one."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(cfg.to_json_best_effort(sort_keys=True))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = sorted(_diff(saved, current))
        structural = [k for k in changed if not k.startswith(("eval.", "metrics.", "checkpoint."))]
        if structural:
            raise checkpoint.CheckpointError(
                f"{workdir} holds a run of a different config (changed: {', '.join(structural[:10])}). "
                "Nothing was changed: resume with the same config, or use a new --workdir.")
    with open(path, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def _shapes(state) -> list:
    return [list(x.shape) for x in jax.tree.leaves(state)]


def run_stage(ctx: Context, name: str, scfg, build: Callable) -> None:
    """Runs (or resumes, or skips if finished) one stage and exports its final weights."""
    out_dir = os.path.join(ctx.workdir, "models", name)
    slot = scfg.model
    if os.path.exists(os.path.join(out_dir, DONE)):
        ctx.slots[slot] = ctx.load(out_dir)
        with open(os.path.join(out_dir, "results.json")) as f:
            ctx.results[name] = json.load(f)
        return
    program: StageProgram = build(ctx, name, scfg)
    ckpts = checkpoint.StageCheckpoints(ctx.workdir, name, keep=ctx.cfg.checkpoint.keep)
    expect = {"config": checkpoint.fingerprint(scfg.to_dict()),
              "model": checkpoint.fingerprint(_shapes(program.state.params))}
    state, start = program.state, 0
    latest = ckpts.latest_step()
    if latest is not None:
        state, meta = ckpts.restore(latest, program.state, expect)
        if program.data is not None:
            program.data.set_state(meta["data"])
        start = latest
        ctx.writer.truncate(name, latest)
    total = int(scfg.steps)
    every = int(ctx.cfg.checkpoint.every)
    max_nonfinite = int(ctx.cfg.checkpoint.get("max_nonfinite", 3))
    _write_cursor(ctx, name, start)
    with sharding.use_mesh(ctx.mesh, ctx.rules):
        for step in tqdm(range(start, total), initial=start, total=total, desc=name,
                         disable=not ctx.cfg.metrics.progress, dynamic_ncols=True):
            t0 = time.perf_counter()
            state, step_metrics = program.step(state, step)
            step_metrics = metrics_lib.to_floats(step_metrics)
            step_metrics["step_time_s"] = time.perf_counter() - t0
            step_metrics.update(memory_metrics())
            if int(state.skipped) >= max_nonfinite:
                raise NonFiniteError(
                    f"Stage {name!r}: {int(state.skipped)} consecutive non-finite losses/gradients at step "
                    f"{step + 1}; stopped. The last good checkpoint in {ckpts.directory} is intact. "
                    "Lower the learning rate or check the data.")
            ctx.writer.write(name, step + 1, step_metrics)
            if (step + 1) % every == 0 or step + 1 == total:
                data_state = program.data.get_state() if program.data is not None else None
                ckpts.save(step + 1, state, {**expect, "data": data_state, "stage": name, "step": step + 1})
                _write_cursor(ctx, name, step + 1)
    model = nnx.merge(program.graphdef, state.params)
    ctx.slots[slot] = model
    stage_results = evaluate_slot(ctx, model)
    ctx.writer.write(name, total, {f"eval_{k}": v for k, v in stage_results.items()})
    ctx.results[name] = stage_results
    models.save_hf(model, out_dir, tokenizer=ctx.tokenizer)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(stage_results, f, indent=2)
    open(os.path.join(out_dir, DONE), "w").close()


def memory_metrics() -> dict:
    """Peak host RSS and, where the backend reports it, device memory in use (GiB)."""
    import resource

    out = {"host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        out["device_bytes_in_use_gib"] = stats["bytes_in_use"] / 2**30
        out["device_peak_bytes_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    return out


def _write_cursor(ctx: Context, stage: str, step: int) -> None:
    with open(os.path.join(ctx.workdir, "cursor.json"), "w") as f:
        json.dump({"stage": stage, "step": step}, f)


def evaluate_slot(ctx: Context, model) -> dict:
    """avg@n accuracy (greedy by default), pass@n, response length and entropy on the first
    `eval.num_prompts` test prompts, sampled as config.eval says."""
    from bridge.evaluation import runner

    ecfg = ctx.cfg.eval
    if not int(ecfg.num_prompts):
        return {}
    n = int(ecfg.get("n", 1))
    out = runner.evaluate(model, ctx.tokenizer, ctx.task, n=n, temperature=float(ecfg.get("temperature", 0.0)),
                          top_p=float(ecfg.get("top_p", 1.0)), top_k=int(ecfg.get("top_k", 0)),
                          max_new_tokens=int(ecfg.max_new_tokens), limit=int(ecfg.num_prompts),
                          batch_size=int(ecfg.batch_size), eos_ids=ctx.eos_ids, mesh=ctx.mesh,
                          rules=ctx.rules, progress=False, seed=int(ctx.cfg.seed))
    m = out["metrics"]
    return {"accuracy": m[f"avg@{n}"], f"pass@{n}": m[f"pass@{n}"], "response_length": m["mean_response_length"],
            "entropy": m["mean_token_entropy"]}


def decode_completions(tokenizer, tokens, mask, eos_ids) -> list[str]:
    """Completion texts without the eos token and padding."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    eos = set(eos_ids)
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m and int(t) not in eos])
            for row, mrow in zip(tokens, mask)]


def place_batch(ctx: Context, batch: dict) -> dict:
    """Host arrays -> device arrays sharded over the batch axes of the mesh."""
    return {k: jax.device_put(jnp.asarray(v), sharding.batch_sharding(ctx.mesh, np.ndim(v), ctx.rules, np.shape(v)))
            for k, v in batch.items()}
