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

from bridge import losses, runtime, scoring
from bridge.stages import Sampling, StageKind, common
from bridge.tasks import loaders


def pad_pool(prompts: list[list[int]], targets: list[list[int]], pad_id: int) -> dict:
    """Ragged prompt / completion ids -> left-padded prompts and right-padded completions."""
    p, n, rows = max(map(len, prompts)), max(map(len, targets)), len(prompts)
    out = {"prompt_tokens": np.full((rows, p), pad_id, np.int32), "prompt_mask": np.zeros((rows, p), bool),
           "tokens": np.full((rows, n), pad_id, np.int32), "mask": np.zeros((rows, n), bool)}
    for i, (a, b) in enumerate(zip(prompts, targets)):
        out["prompt_tokens"][i, p - len(a):] = a
        out["prompt_mask"][i, p - len(a):] = True
        out["tokens"][i, :len(b)] = b
        out["mask"][i, :len(b)] = True
    return out


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
    return pad_pool([task.prompt_ids(e, ctx.tokenizer) for e in examples],
                    [ctx.tokenizer.encode(e.solution, add_special_tokens=False) + eos for e in examples],
                    ctx.pad_id)


def file_pool(ctx: runtime.Context, path: str) -> dict:
    """A JSONL file of {"prompt": text, "completion": text} records (e.g. saved teacher samples)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records or not all("prompt" in r and "completion" in r for r in records):
        raise ValueError(f"{path}: expected JSONL records with 'prompt' and 'completion' fields.")
    eos = [ctx.tokenizer.eos_token_id]
    enc = lambda t: ctx.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    return pad_pool([enc(r["prompt"]) for r in records], [enc(r["completion"]) + eos for r in records], ctx.pad_id)


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
    if os.path.exists(path):
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", **pool)
    os.replace(path + ".tmp.npz", path)
    return pool


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

    def step(state, i):
        idx = common.pool_rows(ctx, unit, i, rows, bs)
        batch = runtime.place_batch(ctx, {k: pool[k][idx] for k in common.Rollout.TOKEN_KEYS})
        state, metrics = trainer.update(state, batch, frozen)
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


KIND = StageKind(
    loop=loop,
    make_loss=lambda scfg, frozen_graphdefs: make_loss_fn(scfg, frozen_graphdefs[0] if frozen_graphdefs else None),
    batch_spec=lambda scfg, rows, prompt_len, completion: common.rollout_batch_spec(rows, prompt_len, completion),
    microbatch_weight=lambda scfg: MICROBATCH_WEIGHT,
    models=models,
    frozen_roles=lambda scfg: ("teacher",) if scfg.loss != "cross_entropy" else (),
    update_rows=lambda scfg: int(scfg.batch_size),
    sampling=_sampling,
    scored_roles=lambda scfg: (),
)
