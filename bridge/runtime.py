"""The training runtime every stage runs on: model slots, the pipeline, the stage loop,
checkpoints, resume, artifacts and the one source of randomness.

A pipeline (`config.pipeline.stages`) is an ordered list of stage names and repeated blocks
("block:<name>" runs `config.pipeline.blocks[<name>].stages` `repeat` times). Each run of a
stage is a `Unit` (stage, iteration), with id "<stage>" outside blocks and "<stage>@<k>" in
iteration k = 1, 2, ... of a block; checkpoints, metrics, exports, artifacts and results are
keyed by that id. A stage config's `per_iteration` sub-config gives a key one value per
iteration (`per_iteration.strategy=("s1", "s1", "s3")`; the last value repeats).

Each stage trains one model *slot* ("teacher", "student", ...) and may read others by
reference: a slot name, "stage:<stage>" (its exported weights), "artifact:<stage>/<name>"
(a model snapshot it published) or "hf:<path>"; inside a block, a stage of the same block
means the current iteration's unit. A stage kind (`bridge.stages.StageKind`) builds

    StageProgram(graphdef, state, step, data),   step(state, i) -> (state, metrics)

and `run_stage` owns everything around it: resume from the latest checkpoint (state +
data-iterator state), metrics, checkpoints every N steps and at the end, the non-finite
guard, and, where the stage exports (`export`, default: every stage outside a block and the
last stage of each block), the full evaluation and a Hugging Face folder. Raising a block's
`repeat` on a finished workdir runs only the new iterations.

Every random choice derives from `ctx.rng(unit, step, purpose)`: a function of (seed, stage,
iteration, step, purpose), so iterations of a block never repeat each other's draws.

A workdir holds one run at a time (`workdir_lock`). A run reads every input before it writes
anything (`_check_inputs`), then records its config; a resume may change only what cannot
mix results (`_check_workdir_config`): any other change must be named in `--allow_changed`,
applies from the first unfinished unit (the stopped unit resumes from its last checkpoint with
it) and is appended to <workdir>/history.jsonl. Each unit's results record the evaluation
settings it was evaluated with and its skipped non-finite updates.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import socket
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from tqdm import tqdm

from bridge import checkpoint, distributed, metrics as metrics_lib, models, sharding
from bridge.mesh import make_mesh

DONE = "STAGE_DONE"
LOCK = "LOCK"
HISTORY = "history.jsonl"


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates; the last good checkpoint is intact."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used: another run holds it, or it is a file or not writable."""


_HELD: dict[str, tuple[str, ...]] = {}  # workdirs whose lock this process holds -> keys allowed to change


@contextlib.contextmanager
def workdir_lock(workdir: str, allow_changed=()):
    """Holds <workdir>/LOCK (this run's host and pid) while the block runs, so two runs never
    write one workdir: a second stops at once naming the first. A lock whose run is gone (the
    same host, its pid not alive: a killed run) is taken over and reported in one line on
    stderr. Creates the workdir, and removes it again if the run leaves it empty (refused at
    startup). `allow_changed`: config keys or prefixes this run may change on resume, read by
    `make_context`. Reentrant within a process."""
    key = os.path.abspath(workdir)
    if key in _HELD:
        yield
        return
    if not distributed.is_main():  # in a multi-process run, process 0 holds the lock for all
        _HELD[key] = tuple(allow_changed)
        try:
            yield
        finally:
            del _HELD[key]
        return
    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        _take_lock(os.path.join(workdir, LOCK))
    except OSError as error:
        what = "it is a file" if os.path.isfile(workdir) else f"{error.strerror}: {error.filename}"
        raise WorkdirError(f"Cannot use {workdir} as the workdir: {what}.") from error
    _HELD[key] = tuple(allow_changed)
    try:
        yield
    finally:
        del _HELD[key]
        os.remove(os.path.join(workdir, LOCK))
        if created and not os.listdir(workdir):
            os.rmdir(workdir)


def _take_lock(path: str) -> None:
    """Creates `path` atomically with its content (written aside, then hard-linked into place,
    which fails if it exists), taking over a lock whose run is gone."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    aside = f"{path}.{me['host']}.{me['pid']}"
    with open(aside, "w") as f:
        json.dump(me, f)
    try:
        while True:
            try:
                os.link(aside, path)
                return
            except FileExistsError:
                pass
            try:
                with open(path) as f:
                    owner = json.load(f)
            except FileNotFoundError:  # released meanwhile
                continue
            except ValueError:  # not written whole by a run of this code
                owner = {}
            owner = owner if isinstance(owner, dict) else {}
            described = f"host {owner.get('host')}, pid {owner.get('pid')}, since {owner.get('since')}"
            if not _lock_owner_gone(owner):
                raise WorkdirError(
                    f"{os.path.dirname(path)} is in use by another run ({described}); nothing was changed. "
                    f"Wait for it to end or use another --workdir (if that run is gone, remove {path}).")
            print(f"warning: taking over the lock of a run that is gone ({described}): {path}", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    finally:
        os.remove(aside)


def _lock_owner_gone(owner: dict) -> bool:
    """True when the lock's run cannot be alive: its pid is not running on this host, or is this
    process's (which does not hold it: a pid reused after a restart), or the lock was never
    written whole. A run on another host cannot be looked at and counts as alive."""
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return True
    if owner.get("host") != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        pass
    return False


@dataclasses.dataclass
class StageProgram:
    graphdef: Any
    state: Any  # TrainState
    step: Callable  # (state, step_index) -> (state, metrics)
    data: Any = None  # iterator with get_state() / set_state(); saved in checkpoints


@dataclasses.dataclass(frozen=True)
class Unit:
    """One run of a stage: iteration 0 outside blocks, 1, 2, ... inside a repeated block."""

    stage: str
    iteration: int = 0
    block: str = ""
    block_stages: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.stage}@{self.iteration}" if self.block else self.stage


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
    saved_config: dict | None = None  # the workdir's config.json as this process found it
    current: Unit | None = None  # the unit being built or run
    stage_tasks: dict = dataclasses.field(default_factory=dict, repr=False)  # `stage_task`'s, by options

    @functools.cached_property
    def eos_ids(self) -> tuple[int, ...]:
        """The tokenizer's eos plus generation_config.json's eos ids of its folder (chat models
        end a turn with a token other than the tokenizer's eos, e.g. Qwen3's <|im_end|>)."""
        spec = tokenizer_spec(self.cfg)
        return models.eos_ids(self.tokenizer, None if spec.startswith("char:") else spec)

    @property
    def pad_id(self) -> int:
        return models.pad_id(self.tokenizer)

    def rng(self, unit: Unit, step: int, purpose: str) -> jax.Array:
        """The key of one random choice: a function of (seed, stage, iteration, step, purpose)."""
        key = jax.random.key(int(self.cfg.seed))
        for part in (zlib.crc32(unit.stage.encode()), unit.iteration, step, zlib.crc32(purpose.encode())):
            key = jax.random.fold_in(key, part)
        return key

    def seed(self, unit: Unit, step: int, purpose: str) -> int:
        """`rng` as a 31-bit integer seed (the sampler's, a data stream's)."""
        return int(jax.random.randint(self.rng(unit, step, purpose), (), 0, 2**31 - 1))

    def np_rng(self, unit: Unit, step: int, purpose: str) -> np.random.Generator:
        """`rng` as a NumPy generator, for host-side shuffles."""
        return np.random.default_rng(self.seed(unit, step, purpose))

    def stage_task(self, scfg):
        """The run's task, or the same task with the stage's `task_options` overriding its
        options (e.g. a larger training split for supervised pretraining); one task object per
        options, so its examples are made once (the startup check, the pool and the held-out
        problems of a 150k-problem SFT pool share them)."""
        overrides = scfg.get("task_options")
        return self.task_with(overrides.to_dict() if overrides else {})

    def task_with(self, overrides: dict):
        """The run's task with some of its options overridden (made once per options)."""
        if not overrides:
            return self.task
        from bridge import tasks

        options = {**self.cfg.task.options.to_dict(), **overrides}
        key = json.dumps(options, sort_keys=True, default=str)
        if key not in self.stage_tasks:
            self.stage_tasks[key] = tasks.get_task(self.cfg.task.name, **options)
        return self.stage_tasks[key]

    def prompts(self, unit: Unit, batch_size: int):
        """The unit's shuffled, checkpointable stream of training prompt batches."""
        from bridge import data

        # every process reads the whole global batch: sampling is SPMD over the global mesh
        # (bridge.distributed), so all processes hold the same rollouts
        return data.make_prompt_iterator(self.task, self.tokenizer, "train", batch_size,
                                         seed=self.seed(unit, 0, "prompts"), pad_id=self.pad_id,
                                         process_index=0, process_count=1)

    def load(self, path: str):
        dtype = self.cfg.get("dtype", "float32")
        return models.load_hf(path, dtype=dtype, param_dtype=self.cfg.get("param_dtype", dtype),
                              mesh=self.mesh, rules=self.rules, remat=bool(self.cfg.get("remat", False)),
                              scan_layers=bool(self.cfg.get("scan_layers", False)))

    def resolve(self, ref: str) -> str:
        """"stage:X" / "artifact:X/name" with X a stage of the current unit's block -> the
        current iteration's unit ("stage:X@k"); other references unchanged."""
        unit = self.current
        for prefix in ("stage:", "artifact:"):
            if ref.startswith(prefix) and unit is not None and unit.block:
                target, sep, rest = ref[len(prefix):].partition("/")
                if "@" not in target and target in unit.block_stages:
                    return f"{prefix}{target}@{unit.iteration}{sep}{rest}"
        return ref

    def model(self, ref: str):
        """A model by reference: a slot name ("teacher"), "stage:<stage>", "artifact:<stage>/<name>"
        (a published snapshot) or "hf:<path>"."""
        ref = self.resolve(ref)
        if ref.startswith("hf:"):
            return self.load(ref[3:])
        if ref.startswith("artifact:"):
            return self.load(self._artifact_path(ref, model=True))
        if ref.startswith("stage:"):
            path = os.path.join(self.workdir, "models", ref[6:])
            if not os.path.exists(os.path.join(path, DONE)):
                raise ValueError(f"Model reference {ref!r}: stage {ref[6:]!r} has not finished or does not "
                                 f"export its weights (no {DONE} in {path}); order the stages so it runs "
                                 "first, with export=True.")
            return self.load(path)
        if ref not in self.slots:
            self.slots[ref] = self._initial_model(ref)
        return self.slots[ref]

    def publish(self, unit: Unit, name: str, value) -> None:
        """Saves a named output of `unit` for later stages: a model (a Hugging Face folder) or
        a dict tree of arrays (.npz); atomic, so a kill never leaves half an artifact."""
        path = os.path.join(self.workdir, "artifacts", unit.id, name)
        if isinstance(value, nnx.Module):
            tmp = path + ".tmp"
            # every process: a tensor sharded over several hosts is gathered alone; process 0 writes
            models.save_hf(value, tmp, tokenizer=self.tokenizer)
            if distributed.is_main():
                if os.path.exists(path):
                    import shutil

                    shutil.rmtree(path)
                os.replace(tmp, path)
            distributed.barrier(f"publish {unit.id}/{name}")
            return
        flat = {"/".join(k): np.asarray(v)
                for k, v in distributed.to_host(traverse_util.flatten_dict(dict(value))).items()}
        if distributed.is_main():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path + ".tmp.npz", **flat)
            os.replace(path + ".tmp.npz", path + ".npz")
        distributed.barrier(f"publish {unit.id}/{name}")

    def artifact(self, ref: str) -> dict:
        """The array tree published as "artifact:<stage>/<name>"."""
        with np.load(self._artifact_path(self.resolve(ref), model=False)) as f:
            return traverse_util.unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})

    def _artifact_path(self, ref: str, *, model: bool) -> str:
        unit_id, _, name = ref[len("artifact:"):].partition("/")
        path = os.path.join(self.workdir, "artifacts", unit_id, name) + ("" if model else ".npz")
        if not name or not os.path.exists(path):
            raise ValueError(f"Artifact {ref!r} does not exist (no {path}): stage {unit_id!r} must run "
                             f"before this stage and publish {name!r}.")
        return path

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
        if distributed.is_main() and not os.path.exists(os.path.join(path, DONE)):
            arch = dict(mcfg.arch)
            arch.setdefault("vocab_size", len(self.tokenizer))
            arch.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            arch.setdefault("bos_token_id", self.tokenizer.bos_token_id)
            cfg = models.ModelConfig(**arch)
            seed = zlib.crc32(slot.encode()) + int(self.cfg.seed)
            model = models.Decoder(cfg, rngs=nnx.Rngs(seed))
            models.save_hf(model, path, tokenizer=self.tokenizer)
            open(os.path.join(path, DONE), "w").close()
        distributed.barrier(f"init {slot}")  # process 0 wrote it; every process loads it
        return self.load(path)


def read_context(cfg, workdir: str) -> Context:
    """A context for reading a run's models and evaluating them: mesh, tokenizer and task, no
    checks and no metrics writer (nothing is written)."""
    from bridge import tasks

    return Context(cfg=cfg, workdir=workdir, mesh=make_mesh(tuple(cfg.mesh.shape)),
                   rules=sharding.as_rules(cfg.mesh.rules) or sharding.DEFAULT_RULES,
                   tokenizer=tokenizer_from_spec(tokenizer_spec(cfg)),
                   task=tasks.get_task(cfg.task.name, **cfg.task.options.to_dict()), writer=None)


def make_context(cfg, workdir: str) -> Context:
    """Builds mesh, tokenizer, task and metrics writer from the config. Every input is read
    (`_check_inputs`) before anything is written; then the workdir's config is checked and
    recorded (`_check_workdir_config`, with the changes allowed by the `workdir_lock` held)."""
    ctx = read_context(cfg, workdir)
    _check_inputs(ctx)
    if distributed.is_main():
        os.makedirs(workdir, exist_ok=True)
    ctx.saved_config = _check_workdir_config(cfg, workdir, _HELD.get(os.path.abspath(workdir), ()))
    ctx.writer = metrics_lib.MetricsWriter(workdir, tensorboard=cfg.metrics.tensorboard,
                                           wandb_project=cfg.metrics.get("wandb_project") or None,
                                           active=distributed.is_main())
    return ctx


def _check_inputs(ctx: Context) -> None:
    """Reads what the run will read, so a bad input stops it at startup with one message (naming
    the file and line or tensor) and the corrected command starts clean: the train split of the
    run's task and of each stage with its own task options (and the reference solutions a gold
    SFT pool trains on), the test split when a unit evaluates, each model folder a stage loads
    (config.json, safetensors headers, tensor names; the weights are checked finite when
    loaded), and `eval.kl_reference` (`_check_kl_reference`)."""
    from bridge import stages
    from bridge.models import hf_io
    from bridge.stages import sft

    units = pipeline_units(ctx.cfg)
    for stage, scfg in {unit.stage: scfg for unit, scfg, _ in units}.items():
        task = ctx.stage_task(scfg)
        task.examples("train")
        if stages.kind(scfg.kind).loop is sft.loop:  # its pool: gold solutions present
            sft.check_inputs(task, scfg, stage)
    evaluates = int(ctx.cfg.eval.num_prompts) and any(export for *_, export in units)
    if evaluates:
        ctx.task.examples("test")
    folders = set(_check_kl_reference(ctx, units) if evaluates else ())
    for _, scfg, _ in units:
        for ref in stages.kind(scfg.kind).models(scfg).values():
            if ref.startswith("hf:"):
                folders.add(ref[3:])
            elif ref in ctx.cfg.models and ctx.cfg.models[ref].get("hf_dir"):
                folders.add(ctx.cfg.models[ref].hf_dir)
    for folder in sorted(folders):
        hf_io.check_hf_dir(folder)


def _check_kl_reference(ctx: Context, units) -> list[str]:
    """`eval.kl_reference`, read by every evaluated unit, checked at startup so a typo stops the
    run naming the key instead of after the first stage trained: a model slot of config.models,
    "hf:<folder>" (checked like every model folder), or "stage:<stage>" / "artifact:<stage>/<name>"
    naming, for each evaluated unit (resolved as `Context.resolve` does there), that unit itself
    or one that runs before it (a stage must export its weights), or one already in the workdir.
    Returns the slot's `hf_dir` to check with the stages' folders."""
    from bridge.models import hf_io

    ref = str(ctx.cfg.eval.get("kl_reference") or "")
    key = f"eval.kl_reference={ref!r}"
    if not ref:
        return []
    if ref.startswith("hf:"):
        try:
            hf_io.check_hf_dir(ref[3:])
        except (ValueError, OSError) as error:
            raise ValueError(f"{key}: {error}") from error
        return []
    prefix = next((p for p in ("stage:", "artifact:") if ref.startswith(p)), "")
    if not prefix:
        if ref not in ctx.cfg.models:
            raise ValueError(f"{key} is neither a model slot (config.models defines {sorted(ctx.cfg.models)}) nor "
                             "a 'stage:<stage>', 'artifact:<stage>/<name>' or 'hf:<folder>' reference.")
        return [ctx.cfg.models[ref].hf_dir] if ctx.cfg.models[ref].get("hf_dir") else []
    if prefix == "artifact:" and not ref.partition("/")[2]:
        raise ValueError(f"{key}: an artifact reference is 'artifact:<stage>/<name>'.")
    order = {unit.id: (position, export) for position, (unit, _, export) in enumerate(units)}
    try:
        for position, (unit, _, export) in enumerate(units):
            if not export:  # only exported units are evaluated
                continue
            ctx.current = unit
            target, _, name = ctx.resolve(ref)[len(prefix):].partition("/")
            if target == unit.id:
                continue
            on_disk = os.path.join(ctx.workdir, *(("models", target, DONE) if prefix == "stage:"
                                                  else ("artifacts", target, name)))
            if target not in order:
                if os.path.exists(on_disk):
                    continue
                raise ValueError(f"{key}: the pipeline has no unit {target!r} (units: {', '.join(order)}) and "
                                 f"{ctx.workdir} holds none.")
            if order[target][0] > position:
                raise ValueError(f"{key}: unit {unit.id!r} is evaluated before {target!r} runs; reference a "
                                 "unit that runs before it, or the unit itself.")
            if prefix == "stage:" and not order[target][1]:
                raise ValueError(f"{key}: stage unit {target!r} does not export its weights (set export=True "
                                 "on it, or reference an artifact it publishes).")
    finally:
        ctx.current = None
    return []


def tokenizer_spec(cfg) -> str:
    """The run's tokenizer: `config.tokenizer` when set, else the folder of the first model
    slot with an `hf_dir` (so overriding a model's hf_dir moves the tokenizer with it)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    folders = [m.hf_dir for m in cfg.models.values() if m.get("hf_dir")]
    if not folders:
        raise ValueError("config.tokenizer is empty and no model has an hf_dir to take it from; set "
                         "--config.tokenizer to a tokenizer folder or 'char:<alphabet>'.")
    return folders[0]


def tokenizer_from_spec(spec: str):
    """"char:<alphabet>" (the toy tokenizers) or a Hugging Face tokenizer folder."""
    if spec.startswith("char:"):
        return models.char_tokenizer(spec[5:])
    return models.load_tokenizer(spec)


def _check_workdir_config(cfg, workdir: str, allow_changed=()) -> dict | None:
    """A workdir belongs to one experiment: refuse to resume under a different one. Metrics,
    checkpoint and system settings may change, and so may a block's `repeat` (raising it runs the new
    iterations); evaluation settings too until a unit has been evaluated (the units' results
    must not mix settings). Any other change must be allowed by `allow_changed` (a key, or a
    prefix such as "eval"); it applies from the first unfinished unit and is appended, with the
    evaluation changes, to history.jsonl. Returns the config the workdir held (None: new)."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(cfg.to_json_best_effort(sort_keys=True))
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = [k for k in sorted(_diff(saved, current)) if not k.startswith(("metrics.", "checkpoint.", "system."))
                   and not (k.startswith("pipeline.blocks.") and k.endswith(".repeat"))]
        finished = _finished_units(workdir)
        evaluated = [u for u, exported in finished.items() if exported]
        refused = [k for k in changed if not (k.startswith("eval.") and not evaluated)
                   and not any(k == a or k.startswith(a + ".") for a in allow_changed)]
        if refused:
            why = (f"; the finished units {', '.join(evaluated)} were evaluated with the saved eval settings"
                   if any(k.startswith("eval.") for k in refused) else "")
            raise checkpoint.CheckpointError(
                f"{workdir} holds a run of a different config (changed: {', '.join(refused[:10])}){why}. "
                "Nothing was changed: resume with the same config, use a new --workdir, or allow the change "
                f"with --allow_changed={','.join(refused[:10])} (it applies from the first unfinished unit "
                f"and is recorded in {HISTORY}).")
        if changed:
            first = next((u.id for u, _, _ in pipeline_units(cfg) if u.id not in finished), None)
            entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_unit": first,
                     "changed": {k: [_get(saved, k), _get(current, k)] for k in changed}}
            distributed.barrier("workdir config read")  # every process has read history.jsonl
            if distributed.is_main():
                with open(os.path.join(workdir, HISTORY), "a") as f:
                    f.write(json.dumps(entry) + "\n")
    distributed.barrier("workdir config checked")  # every process has read config.json
    if distributed.is_main():
        with open(path, "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)
    distributed.barrier("workdir config written")
    return saved


def _finished_units(workdir: str) -> dict[str, bool]:
    """unit id -> whether it exported (and so was evaluated), for every finished unit."""
    out = {}
    root = os.path.join(workdir, "stages")
    for unit_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if os.path.exists(os.path.join(root, unit_id, "DONE.json")):
            with open(os.path.join(root, unit_id, "DONE.json")) as f:
                out[unit_id] = bool(json.load(f).get("exported"))
    return out


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _config_fingerprints(ctx: Context, unit: Unit, scfg) -> set[str]:
    """Fingerprints of `unit`'s stage config now, as the workdir's config.json held it before
    this process (a knob added to the code since, off, is no change: `_diff`), and before each
    change in history.jsonl, so a checkpoint written before an allowed change restores (and the
    stopped unit resumes with it)."""
    out = {checkpoint.fingerprint(scfg.to_dict())}
    saved_stage = (ctx.saved_config or {}).get("stages", {}).get(unit.stage)
    if saved_stage is not None:
        out.add(checkpoint.fingerprint(for_iteration(ml_collections.ConfigDict(saved_stage), unit.iteration).to_dict()))
    path = os.path.join(ctx.workdir, HISTORY)
    if not os.path.exists(path):
        return out
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    config = json.loads(ctx.cfg.to_json_best_effort(sort_keys=True))
    for entry in reversed(entries):
        config = copy.deepcopy(config)
        for key, (old, _) in entry["changed"].items():
            *parents, last = key.split(".")
            node = config
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = old
        stage_cfg = ml_collections.ConfigDict(config)["stages"].get(unit.stage)
        if stage_cfg is not None:
            out.add(checkpoint.fingerprint(for_iteration(stage_cfg, unit.iteration).to_dict()))
    return out


def is_off(value) -> bool:
    """A setting that is off: False, 0, "", None, or a container of only such values."""
    if isinstance(value, dict):
        return all(is_off(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(is_off(v) for v in value)
    return not value


def _diff(a, b, prefix=""):
    """The dotted keys where config trees `a` and `b` differ. A key on one side only whose value
    is off (`is_off`) is no difference: a knob added to the code later defaults to off, and a
    run saved before it existed computed what it computes off."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            if (k not in a and is_off(b[k])) or (k not in b and is_off(a[k])):
                continue
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def _shapes(state) -> list:
    return [list(x.shape) for x in jax.tree.leaves(state)]


def for_iteration(scfg, iteration: int):
    """The stage config of one iteration: each `per_iteration` key takes its value for this
    iteration (1-based; the last value repeats; iteration 0, outside blocks, takes the first)."""
    per = scfg.get("per_iteration")
    if not per or not per.to_dict():
        return scfg
    out = scfg.copy_and_resolve_references()
    with out.unlocked():
        for key, values in per.items():
            values = tuple(values)
            out[key] = values[min(max(iteration, 1), len(values)) - 1]
    return out


def pipeline_units(cfg) -> list[tuple[Unit, Any, bool]]:
    """(unit, its stage config, whether it exports) for every unit of the pipeline, in order.
    Fails before any work on an undefined stage or block, a stage used twice, or an unknown kind."""
    from bridge import stages

    entries, seen = [], set()
    for entry in cfg.pipeline.stages:
        if entry.startswith("block:"):
            name = entry[len("block:"):]
            if name not in cfg.pipeline.get("blocks", {}):
                raise ValueError(f"Pipeline block {name!r} is not defined in config.pipeline.blocks.")
            block = cfg.pipeline.blocks[name]
            entries.append((name, tuple(block.stages), int(block.repeat)))
        else:
            entries.append(("", (entry,), 1))
    units = []
    for block, names, repeat in entries:
        for stage in names:
            if stage not in cfg.stages:
                raise ValueError(f"Pipeline stage {stage!r} is not defined in config.stages "
                                 f"(defined: {', '.join(sorted(cfg.stages))}).")
            if stage in seen:
                raise ValueError(f"Stage {stage!r} appears twice in the pipeline; define a second stage.")
            seen.add(stage)
            stages.kind(cfg.stages[stage].kind)  # an unknown kind fails before any work
        for k in range(1, repeat + 1) if block else [0]:
            for position, stage in enumerate(names):
                scfg = for_iteration(cfg.stages[stage], k)
                default = not block or position == len(names) - 1
                units.append((Unit(stage, k, block, names), scfg, bool(scfg.get("export", default))))
    return units


def run_pipeline(cfg, workdir: str) -> Context:
    """Runs (or resumes) every unit of the pipeline in order; returns the context (results)."""
    from bridge import stages

    units = pipeline_units(cfg)
    with workdir_lock(workdir):
        ctx = make_context(cfg, workdir)
        try:
            for unit, scfg, export in units:
                run_stage(ctx, unit, scfg, stages.kind(scfg.kind), export=export)
        finally:
            ctx.current = None
            ctx.writer.close()
    return ctx


def _done_path(ctx: Context, unit: Unit) -> str:
    return os.path.join(ctx.workdir, "stages", unit.id, "DONE.json")


def run_stage(ctx: Context, unit: Unit, scfg, kind, *, export: bool = True) -> None:
    """Runs (or resumes, or skips if finished) one unit; with `export`, evaluates the trained
    model on held-out prompts and writes it as a Hugging Face folder."""
    ctx.current = unit
    out_dir = os.path.join(ctx.workdir, "models", unit.id)
    slot = scfg.model
    done = _done_path(ctx, unit)
    if os.path.exists(done) and os.path.exists(os.path.join(out_dir, DONE)):
        ctx.slots[slot] = ctx.load(out_dir)
        with open(done) as f:
            ctx.results[unit.id] = json.load(f)["results"]
        return
    started = time.perf_counter()
    program: StageProgram = kind.build(ctx, unit, scfg)
    ckpts = checkpoint.StageCheckpoints(ctx.workdir, unit.id, keep=ctx.cfg.checkpoint.keep)
    expect = {"config": checkpoint.fingerprint(scfg.to_dict()),
              "model": checkpoint.fingerprint(_shapes(program.state.params))}
    state, start = program.state, 0
    latest = ckpts.latest_step()
    if latest is not None:
        accepted = {**expect, "config": _config_fingerprints(ctx, unit, scfg)}
        state, meta = ckpts.restore(latest, program.state, accepted)
        if program.data is not None:
            program.data.set_state(meta["data"])
        start = latest
    ctx.writer.truncate(unit.id, start)  # records of steps after the checkpoint (a killed run) go
    total = int(scfg.steps)
    if latest is not None and meta.get("stopped"):  # ended early by its own stopping rule, then killed
        total = start
    every = int(ctx.cfg.checkpoint.every)
    max_nonfinite = int(ctx.cfg.checkpoint.get("max_nonfinite", 3))
    snapshots = {int(k) for k in scfg.get("export_steps", ())}  # steps that publish the model
    _write_cursor(ctx, unit.id, start)
    with sharding.use_mesh(ctx.mesh, ctx.rules):
        for step in tqdm(range(start, total), initial=start, total=total, desc=unit.id,
                         disable=not ctx.cfg.metrics.progress or not distributed.is_main(), dynamic_ncols=True):
            t0 = time.perf_counter()
            state, step_metrics = program.step(state, step)
            step_metrics = metrics_lib.to_floats(step_metrics)
            step_metrics["step_time_s"] = time.perf_counter() - t0
            step_metrics.update(memory_metrics())
            if int(state.skipped) >= max_nonfinite:
                raise NonFiniteError(
                    f"Stage {unit.id!r}: {int(state.skipped)} consecutive non-finite losses/gradients at step "
                    f"{step + 1}; stopped. The last good checkpoint in {ckpts.directory} is intact. "
                    "Lower the learning rate or check the data, and resume naming the change: "
                    f"--config.stages.{unit.stage}.optimizer.lr=... "
                    f"--allow_changed=stages.{unit.stage}.optimizer.lr")
            stop = bool(step_metrics.pop("stop", 0.0))  # a stage's stopping rule ends it early
            if _held_out_due(ctx, snapshots, step + 1, total, stop):
                current = kind.policy_of(nnx.merge(program.graphdef, state.params))
                step_metrics.update(held_out_curve(ctx, current))
                if step + 1 in snapshots:
                    ctx.publish(unit, f"step{step + 1}", current)
            ctx.writer.write(unit.id, step + 1, step_metrics)
            if (step + 1) % every == 0 or step + 1 == total or stop:
                data_state = program.data.get_state() if program.data is not None else None
                ckpts.save(step + 1, state, {**expect, "data": data_state, "stage": unit.id, "step": step + 1,
                                             "stopped": stop})
                _write_cursor(ctx, unit.id, step + 1)
            if stop:
                total = step + 1  # the evaluation record carries the step the stage ended at
                break
    model = kind.policy_of(nnx.merge(program.graphdef, state.params))
    ctx.slots[slot] = model
    if os.path.exists(done):  # finished before (not exported): restored from its last checkpoint
        with open(done) as f:
            ctx.results[unit.id] = json.load(f)["results"]
        return
    stage_results = {}
    if export:  # a kill from here to DONE evaluates again on resume: the record is replaced
        kl_reference = _stage_kl_reference(ctx, unit, scfg) or ctx.cfg.eval.get("kl_reference") or ""
        stage_results = evaluate_slot(ctx, model, kl_reference)
        if stage_results:
            ctx.writer.write(unit.id, total, {f"eval_{k}": v for k, v in stage_results.items()}, replace=True)
        stage_results["eval"] = {**ctx.cfg.eval.to_dict(), "kl_reference": kl_reference}
    stage_results.update(_unit_totals(ctx, unit))
    # steps: where the stage ended (its stopping rule may end it early); optimizer_updates: the
    # train state's update counter (empty batches are not updates); wall_time_s: this
    # process's time on the unit (build, compile, steps, evaluation), for the summary table
    stage_results.update(steps=total, optimizer_updates=int(state.step),
                         wall_time_s=round(time.perf_counter() - started, 2))
    ctx.results[unit.id] = stage_results
    if export:  # every process: a tensor sharded over several hosts is gathered alone; process 0 writes
        models.save_hf(model, out_dir, tokenizer=ctx.tokenizer)
    if distributed.is_main():  # process 0 writes the unit's files, the others wait for them
        if export:
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(stage_results, f, indent=2)
            open(os.path.join(out_dir, DONE), "w").close()
        os.makedirs(os.path.dirname(done), exist_ok=True)
        with open(done + ".tmp", "w") as f:
            json.dump({"results": stage_results, "exported": export, "iteration": unit.iteration}, f)
        os.replace(done + ".tmp", done)
    distributed.barrier(f"done {unit.id}")


def _held_out_due(ctx: Context, snapshots: set, step: int, total: int, stop: bool) -> bool:
    """Whether step `step` evaluates the held-out curve (every `eval.every` steps, and at the
    stage's last step) or exports a snapshot (a step in `snapshots`, the stage's `export_steps`)."""
    every = int(ctx.cfg.eval.get("every", 0))
    curve = every > 0 and (step % every == 0 or step == total or stop)
    return curve or step in snapshots


def held_out_curve(ctx: Context, model) -> dict:
    """Greedy accuracy of `model` on the first `eval.curve_prompts` test problems of the run's
    task ("held_out_accuracy") and of each task variant in `eval.curve_tasks` (name -> option
    overrides, e.g. validation=dict(seed=1): "held_out_validation_accuracy"), logged with the
    step's metrics, so every stage's learning curve is on held-out problems."""
    from bridge.evaluation import runner

    ecfg = ctx.cfg.eval
    if int(ecfg.get("every", 0)) <= 0:
        return {}
    variants = {"": {}, **{name: dict(options) for name, options in ecfg.get("curve_tasks", {}).items()}}
    out = {}
    for name, options in variants.items():
        result = runner.evaluate(model, ctx.tokenizer, ctx.task_with(options), n=1, temperature=0.0, top_p=1.0,
                                 top_k=0, max_new_tokens=int(ecfg.max_new_tokens),
                                 limit=int(ecfg.get("curve_prompts", ecfg.num_prompts)),
                                 batch_size=int(ecfg.batch_size), eos_ids=ctx.eos_ids, mesh=ctx.mesh,
                                 rules=ctx.rules, progress=False, seed=int(ctx.cfg.seed))
        out[f"held_out_{name}_accuracy" if name else "held_out_accuracy"] = result["metrics"]["avg@1"]
    return out


def _stage_kl_reference(ctx: Context, unit: Unit, scfg) -> str:
    """A stage's `eval_kl_reference` (e.g. "stage:student_sft", the base of its model), or ""
    when it names a stage unit that is neither this unit nor exported in the workdir (a pipeline
    without that base: its evaluation then reports no KL)."""
    ref = str(scfg.get("eval_kl_reference") or "")
    if ref.startswith("stage:"):
        target = ctx.resolve(ref)[len("stage:"):]
        if target != unit.id and not os.path.exists(os.path.join(ctx.workdir, "models", target, DONE)):
            return ""
    return ref


def _unit_totals(ctx: Context, unit: Unit) -> dict:
    """From the unit's step records: `nonfinite_skipped_updates`, the sum over its steps of
    `update_skipped` (the fraction of the step's updates skipped; a count at one update a
    step), and `train_time_s`, the sum of its step times (across resumes)."""
    records = metrics_lib.read_metrics(ctx.workdir).get(unit.id, [])
    skipped = sum(r.get("update_skipped", 0.0) for r in records)
    return {"nonfinite_skipped_updates": int(skipped) if skipped == int(skipped) else skipped,
            "train_time_s": round(sum(r.get("step_time_s", 0.0) for r in records), 2)}


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
    if not distributed.is_main():
        return
    with open(os.path.join(ctx.workdir, "cursor.json"), "w") as f:
        json.dump({"stage": stage, "step": step}, f)


def evaluate_slot(ctx: Context, model, kl_reference: str | None = None) -> dict:
    """avg@n accuracy (greedy by default), pass@n, response length and entropy on the first
    `eval.num_prompts` test prompts, sampled as config.eval says; with `kl_reference` (default
    `eval.kl_reference`; a stage's `eval_kl_reference` in `run_stage`: a model reference, e.g.
    the base model) also the KL to it along the sampled completions
    (`bridge.evaluation.runner`: exact over the vocabulary, summed per completion and per token)."""
    from bridge.evaluation import runner

    ecfg = ctx.cfg.eval
    if not int(ecfg.num_prompts):
        return {}
    n = int(ecfg.get("n", 1))
    reference, kl_reference = None, ecfg.get("kl_reference") if kl_reference is None else kl_reference
    if kl_reference:  # the unit that makes the reference compares against itself (KL 0)
        own = ctx.current is not None and ctx.resolve(kl_reference) == f"stage:{ctx.current.id}"
        reference = model if own else ctx.model(kl_reference)
    out = runner.evaluate(model, ctx.tokenizer, ctx.task, n=n, temperature=float(ecfg.get("temperature", 0.0)),
                          top_p=float(ecfg.get("top_p", 1.0)), top_k=int(ecfg.get("top_k", 0)),
                          max_new_tokens=int(ecfg.max_new_tokens), limit=int(ecfg.num_prompts),
                          batch_size=int(ecfg.batch_size), eos_ids=ctx.eos_ids, mesh=ctx.mesh,
                          rules=ctx.rules, progress=False, seed=int(ctx.cfg.seed), reference_model=reference)
    m = out["metrics"]
    results = {"accuracy": m[f"avg@{n}"], f"pass@{n}": m[f"pass@{n}"], "response_length": m["mean_response_length"],
               "entropy": m["mean_token_entropy"]}
    results.update({k: m[k] for k in ("kl_to_reference", "kl_to_reference_per_token") if k in m})
    return results


def decode_completions(tokenizer, tokens, mask, eos_ids) -> list[str]:
    """Completion texts without the eos token and padding."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    eos = set(eos_ids)
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m and int(t) not in eos])
            for row, mrow in zip(tokens, mask)]


def place_batch(ctx: Context, batch: dict) -> dict:
    """Host arrays -> device arrays sharded over the batch axes of the mesh. With several
    processes every one holds the same global batch (`bridge.distributed`) and passes the rows
    its devices hold to `jax.make_array_from_process_local_data`."""
    if jax.process_count() > 1:
        return {k: distributed.global_array(v, sharding.batch_sharding(ctx.mesh, np.ndim(v), ctx.rules, np.shape(v)))
                for k, v in batch.items()}
    return {k: jax.device_put(jnp.asarray(v), sharding.batch_sharding(ctx.mesh, np.ndim(v), ctx.rules, np.shape(v)))
            for k, v in batch.items()}
