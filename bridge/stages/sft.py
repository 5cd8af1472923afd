"""Supervised stages on a fixed pool of completions: forward-KL warmup and plain SFT.

Pool (built once, saved in the workdir so a resumed run reuses it):
  source="teacher": `sampling.n` teacher samples for each of `pool_prompts` prompts;
  source="gold":    the task's reference completions (used to pretrain toy models); a pool
                    example without one stops the run at startup naming its record;
  pool_file=path:   a JSONL file of {"prompt", "completion"} texts, read instead of sampling.
`task_options` override the run task's options for the pool (e.g. a larger train split).
Loss:
  loss="forward_kl":    mean_t KL(p_T(.|x,y<t) || p_S(.|x,y<t)) over the full vocabulary
                        (the bridge's warmup; streamed through bridge.kernels.logprobs);
  loss="cross_entropy": -mean_t log p_S(y_t | x, y<t) on the pool's tokens (SeqKD / SFT).
Rows are drawn by a seeded permutation per epoch (`ctx.np_rng`), so the batch at step i is a
function of (seed, stage, iteration, i).
Stopping rule: with until_accuracy > 0, every `check_every` steps the greedy accuracy on the
last `check_prompts` training examples (held out of the pool) is measured and logged
(`validation_accuracy`); the stage ends at the first check that reaches until_accuracy, or at
`steps`. A controlled starting skill, instead of a fixed step count on the edge of a skill jump.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from bridge import distributed, losses, offload, runtime, scoring
from bridge.stages import Sampling, StageKind, common
from bridge.tasks import base, loaders


def _ragged(rows: list[list[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (ids int32[R, L], mask bool[R, L]), padded on the left or the right."""
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    width = int(lengths.max()) if len(rows) else 0
    flat = np.fromiter((t for row in rows for t in row), np.int32, int(lengths.sum()))
    column = np.arange(width)[None, :]
    mask = column >= (width - lengths)[:, None] if left else column < lengths[:, None]
    ids = np.full((len(rows), width), pad_id, np.int32)
    ids[mask] = flat  # row-major order of the mask is each row's ids in order
    return ids, mask


def pad_pool(prompts: list[list[int]], targets: list[list[int]], pad_id: int) -> dict:
    """Ragged prompt / completion ids -> left-padded prompts and right-padded completions."""
    prompt_tokens, prompt_mask = _ragged(prompts, pad_id, left=True)
    tokens, mask = _ragged(targets, pad_id, left=False)
    return {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask, "tokens": tokens, "mask": mask}


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one batched tokenizer call."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def prompt_ids(task, examples, tokenizer) -> list[list[int]]:
    """`task.prompt_ids` of every example: raw-text prompts in one batched tokenizer call (a pool
    of 150k toy problems: 1 s instead of 15), chat templates and overrides one by one."""
    if getattr(task, "chat", False) or type(task).prompt_ids is not base.Task.prompt_ids:
        return [task.prompt_ids(e, tokenizer) for e in examples]
    return encode_texts(tokenizer, [task.prompt_text(e) for e in examples])


def check_solutions(task, examples, stage: str = "") -> None:
    """A gold pool trains on each example's reference solution: one missing (a MATH file with
    answers only) is a ValueError naming the file and line of its record."""
    for example in examples:
        if not isinstance(example.solution, str) or not example.solution.strip():
            where = loaders.record_location(task, example) or f"task {task.name!r} example {example.id!r}"
            who = f"stage {stage!r}" if stage else "a gold SFT pool"
            raise ValueError(
                f"{where}: the record has no \"solution\", and {who} trains on the reference solutions "
                "(source='gold'); give every training record a solution, or build the pool with "
                "source='teacher' or a pool_file.")


def check_inputs(task, scfg, stage: str) -> None:
    """What the stage will read from its task, checked at startup (`runtime._check_inputs`): the
    pool's examples, and with source='gold' (no pool_file) their reference solutions."""
    examples = pool_examples(task, scfg)
    if scfg.source == "gold" and not scfg.get("pool_file"):
        check_solutions(task, examples, stage)


def gold_pool(ctx: runtime.Context, examples, task=None) -> dict:
    """Prompt + reference completion + eos for each example."""
    eos = [ctx.tokenizer.eos_token_id]
    task = task or ctx.task
    check_solutions(task, examples, ctx.current.id if ctx.current is not None else "")
    return pad_pool(prompt_ids(task, examples, ctx.tokenizer),
                    [ids + eos for ids in encode_texts(ctx.tokenizer, [e.solution for e in examples])], ctx.pad_id)


def file_pool(ctx: runtime.Context, path: str) -> dict:
    """A JSONL file of {"prompt": text, "completion": text} records (e.g. saved teacher samples)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records or not all("prompt" in r and "completion" in r for r in records):
        raise ValueError(f"{path}: expected JSONL records with 'prompt' and 'completion' fields.")
    eos = [ctx.tokenizer.eos_token_id]
    completions = encode_texts(ctx.tokenizer, [r["completion"] for r in records])
    return pad_pool(encode_texts(ctx.tokenizer, [r["prompt"] for r in records]), [c + eos for c in completions],
                    ctx.pad_id)


def teacher_pool(ctx: runtime.Context, teacher, examples, scfg, unit) -> dict:
    """`sampling.n` teacher samples per prompt, drawn in chunks."""
    roll = common.sample_rollout(ctx, teacher, examples, scfg.sampling, seed=ctx.seed(unit, 0, "pool"),
                                 chunk_prompts=scfg.sample_batch_size)
    return {**roll.token_arrays(), "rewards": roll.rewards}


def split_validation(task, scfg) -> tuple[list, list]:
    """(pool examples, validation examples): with a stopping rule (`until_accuracy` > 0) the
    last `check_prompts` training examples are held out of the pool to decide when to stop."""
    examples = list(task.examples("train"))
    held = int(scfg.check_prompts) if scfg.get("until_accuracy", 0.0) > 0 else 0
    if held >= len(examples):
        raise ValueError(f"check_prompts={held} leaves no training examples ({len(examples)} in the split).")
    return (examples[:-held], examples[-held:]) if held else (examples, [])


def pool_examples(task, scfg) -> list:
    """The training examples the pool is built from: the split less the held-out validation
    examples, the first `pool_prompts` of them when set."""
    examples, _ = split_validation(task, scfg)
    return examples[: int(scfg.pool_prompts)] if scfg.pool_prompts else examples


def validation_accuracy(ctx, model, examples, scfg) -> float:
    """Greedy accuracy of `model` on held-out training examples (the stopping rule's measure)."""
    greedy = scfg.sampling.copy_and_resolve_references()
    greedy.update(n=1, temperature=0.0)
    return float(common.sample_rollout(ctx, model, examples, greedy, seed=0).correct.mean())


def load_or_build_pool(ctx, unit, scfg, teacher) -> dict:
    path = os.path.join(ctx.workdir, "stages", unit.id, "pool.npz")
    saved = os.path.exists(path)
    distributed.barrier(f"pool check {unit.id}")  # every process decides before process 0 writes
    if saved:
        with np.load(path) as f:
            return dict(f)
    task = ctx.stage_task(scfg)
    examples = pool_examples(task, scfg)
    if scfg.get("pool_file"):
        pool = file_pool(ctx, scfg.pool_file)
    elif scfg.source == "gold":
        pool = gold_pool(ctx, examples, task)
    else:
        pool = teacher_pool(ctx, teacher, examples, scfg, unit)
    if distributed.is_main():  # every process built the same pool; process 0 writes it
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **pool)
        os.replace(path + ".tmp.npz", path)
    distributed.barrier(f"pool {unit.id}")
    return pool


class PoolOrder:
    """`common.pool_rows` (the rows of update `step`: slices of one seeded permutation per
    epoch), each epoch's permutation drawn once instead of twice a step (a 150k-row pool: 30 ms
    a step)."""

    def __init__(self, ctx: runtime.Context, unit, rows: int, batch_size: int):
        self.ctx, self.unit, self.rows, self.batch_size = ctx, unit, rows, batch_size
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            for old in [e for e in self._orders if e < epoch - 1]:
                del self._orders[old]
            self._orders[epoch] = self.ctx.np_rng(self.unit, epoch, "order").permutation(self.rows)
        return self._orders[epoch]

    def __call__(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step * self.batch_size, self.rows)
        order = self._order(epoch)
        if pos + self.batch_size > self.rows:
            order = np.concatenate([order, self._order(epoch + 1)])
        return order[pos:pos + self.batch_size]


MICROBATCH_WEIGHT = common.token_count()  # every sft loss is a token mean


def make_loss_fn(scfg, teacher_graphdef):
    def loss_fn(model, batch, frozen):
        mask = batch["mask"]
        if scfg.loss == "cross_entropy":
            logp = scoring.completion_logprobs(model, batch)
            loss = -losses.masked_mean(logp, mask)
            return loss, {"nll": loss}
        teacher = nnx.merge(teacher_graphdef, frozen[0])
        div = scoring.completion_divergence(model, teacher, batch, scfg.loss, temperature=scfg.teacher_temperature)
        loss = losses.masked_mean(div, mask)
        return loss, {scfg.loss: loss}

    return loss_fn


SFT_LOSSES = ("cross_entropy", "forward_kl", "reverse_kl", "jsd", "forward_ce")


def models(scfg) -> dict:
    """The policy (trained) and the teacher, when it samples the pool or is distilled from."""
    out = {"policy": scfg.get("init") or scfg.model}
    if scfg.source == "teacher" or scfg.loss != "cross_entropy":
        out["teacher"] = scfg.teacher
    return out


def check(name: str, scfg) -> None:
    if scfg.loss not in SFT_LOSSES:
        raise ValueError(f"Stage {name!r}: unknown sft loss {scfg.loss!r}; choose one of {SFT_LOSSES}.")
    if scfg.source not in ("gold", "teacher"):
        raise ValueError(f"Stage {name!r}: source must be 'gold' or 'teacher', not {scfg.source!r}.")


def loop(ctx: runtime.Context, unit, scfg, kind) -> runtime.StageProgram:
    check(unit.id, scfg)
    refs = models(scfg)
    model = ctx.model(refs["policy"])
    teacher = ctx.model(refs["teacher"]) if "teacher" in refs else None
    if teacher is not None:
        common.check_vocab(teacher, model, unit.id)
    pool = load_or_build_pool(ctx, unit, scfg, teacher)
    if teacher is not None:  # system.frozen_on_host: in host memory from here on
        offload.park(ctx, teacher)
    frozen_graphdefs, frozen = (), None
    if kind.frozen_roles(scfg):
        teacher_graphdef, teacher_state = nnx.split(teacher)
        frozen_graphdefs, frozen = (teacher_graphdef,), (teacher_state,)
    trainer = common.make_trainer(ctx, kind, scfg, model, frozen_graphdefs, scfg.steps)
    rows = len(pool["tokens"])
    bs = int(scfg.batch_size)
    if bs > rows:
        raise ValueError(f"Stage {unit.id!r}: batch_size {bs} exceeds the pool's {rows} rows.")

    _, validation = split_validation(ctx.stage_task(scfg), scfg)
    order = PoolOrder(ctx, unit, rows, bs)

    def step(state, i):
        idx = order(i)
        batch = runtime.place_batch(ctx, {k: pool[k][idx] for k in common.Rollout.TOKEN_KEYS})
        state, metrics = trainer.update(state, batch, offload.fetch(frozen))
        metrics = dict(metrics, response_length=float(pool["mask"][idx].sum(1).mean()))
        if "rewards" in pool:
            metrics["pool_reward"] = float(pool["rewards"][idx].mean())
        if validation and (i + 1) % int(scfg.check_every) == 0:
            accuracy = validation_accuracy(ctx, common.current_model(trainer, state), validation, scfg)
            metrics.update(validation_accuracy=accuracy, stop=float(accuracy >= scfg.until_accuracy))
        return state, metrics

    return runtime.StageProgram(trainer.graphdef, trainer.state, step, None)


def _sampling(scfg):
    """The teacher samples the pool, `sample_batch_size` prompts a call."""
    if scfg.source != "teacher":
        return None
    return Sampling("teacher", int(scfg.sample_batch_size), int(scfg.sampling.n), scfg.sampling)


def _rollouts(cfg, scfg, steps: int) -> int:
    """The teacher's pool: n samples for each of `pool_prompts` prompts (0: the whole train split)."""
    if scfg.source != "teacher":
        return 0
    options = {**cfg.task.options.to_dict(), **(scfg.task_options.to_dict() if scfg.get("task_options") else {})}
    return int(scfg.sampling.n) * int(scfg.pool_prompts or options.get("num_train", 0))


KIND = StageKind(
    loop=loop,
    make_loss=lambda scfg, frozen_graphdefs: make_loss_fn(scfg, frozen_graphdefs[0] if frozen_graphdefs else None),
    batch_spec=lambda scfg, rows, prompt_len, completion: common.rollout_batch_spec(rows, prompt_len, completion),
    microbatch_weight=lambda scfg: MICROBATCH_WEIGHT,
    models=models,
    frozen_roles=lambda scfg: ("teacher",) if scfg.loss != "cross_entropy" else (),
    update_rows=lambda scfg: int(scfg.batch_size),
    sampling=_sampling,
    rollouts=_rollouts,
    scored_roles=lambda scfg: (),
)
