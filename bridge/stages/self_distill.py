"""Self-distillation with privileged context: the model is its own teacher, given what the
student does not see.

One step: the student samples `sampling.n` completions of each plain prompt x; the task
writes a privileged context c_i for each completion y_i (`Task.privileged_context`, config
`context`); the teacher is the same model scoring the same completion tokens after the prompt
(c_i, x), and the student is trained towards it on its own samples:
  "opsd"      c = the reference solution (OPSD, "On-Policy Self-Distillation");
  "sdpo"      c = the verifier's verdict on y_i and a successful y_j of the same group
              (SDPO, "Reinforcement learning via self-distillation": Self-Distillation Policy
              Optimization turns scalar rewards into feedback);
  "hint"      c = a hindsight hint from the failure (OpenClaw-RL's hindsight-guided OPD);
  "critique"  c = a step-aligned critique naming y_i's first failing step (the task's
              `step_checker`).
A completion whose context is empty (a correct one, for "hint" and "critique") is not distilled.
A task that cannot supply the context stops before any training (`Task.check_context`).

The teacher's prompt is longer than the student's: its prompts are tokenized again and
left-padded to their own width (the prompt width plus a multiple of `context_tokens`), so the
hidden state predicting completion token t sits at the last prompt position plus t for both,
and `bridge.scoring` scores the same `tokens`/`mask` under either prompt.

Teacher weights (`teacher`):
  "frozen"  the policy at the stage start (rebuilt identically on resume);
  "live"    the current policy under stop_gradient: the full-vocabulary losses run the
            teacher pass on the differentiated model itself (no copy of the donated state);
            the sampled loss scores it before the update;
  "ema"     theta_T <- d theta_T + (1 - d) theta after every applied update (d = `ema_decay`),
            carried in the optimizer state (`with_ema`), so checkpoints hold it and a resume
            after a kill continues it exactly; a copy goes to the update as its frozen teacher.

Divergence (`loss`), per completion token, student S and teacher T, temperature-scaled:
  "jsd"                 generalized JSD, beta KL(T || M) + (1 - beta) KL(S || M),
                        M = (1 - beta) S + beta T (`beta`, default 0.5; GKD);
  "reverse_kl"          KL(S || T);   "forward_kl"  KL(T || S);
  "forward_ce"          -sum_v p_T log p_S (DistIL's forward cross-entropy);
  "sampled_reverse_kl"  the dense advantage A_t = -coef (log p_S_old(y_t) - log p_T(y_t)) in
                        the clipped surrogate, as the opd stage's sampled path.
The full-vocabulary ones stream over the vocabulary (`bridge.kernels.logprobs`; never
[B, T, V]); `divergence_top_k` > 0 takes the teacher's top-k tokens plus a tail bucket.

SRPO routing (`route="srpo"`; SRPO, "Unifying Group-Relative and Self-Distillation Policy
Optimization via Sample Routing"): correct completions take the GRPO surrogate with the
group's advantages, failed ones the self-distillation loss with entropy-aware token weights
that down-weight high-entropy (unreliable) teacher targets. Our form of the weighting:
    w_t = n exp(-H_T(t) / tau) / sum_{s in routed} exp(-H_T(s) / tau)
over the n distilled tokens of the batch (H_T the teacher's entropy, tau = `entropy_tau`), so
the weights average 1. The loss is one token mean over both routes:
    L = (sum_{distilled t} w_t D_t + sum_{GRPO t} l_t) / (sum w_t + #GRPO tokens).
The fractions of completions routed each way are reported (`route_sd_frac`, `route_rl_frac`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bridge import advantages as adv_lib, losses, offload, runtime, sampling, scoring
from bridge.kernels.logprobs import token_divergence
from bridge.losses import aggregation
from bridge.stages import StageKind, common
from bridge.tasks.base import CONTEXT_MODES, Attempt, RewardResult

FULL_LOSSES = ("jsd", "reverse_kl", "forward_kl", "forward_ce")
PG_LOSSES = ("sampled_reverse_kl",)
TEACHERS = ("frozen", "live", "ema")
ROUTES = ("", "srpo")


def microbatch_weight(scfg):
    """The loss is one token mean over distilled tokens (weighted) and GRPO tokens."""
    def weight(batch):
        return jnp.sum(batch["mask"] * (batch["sd_weight"] + batch["rl_weight"][:, None]))
    return weight


def teacher_batch(batch: dict) -> dict:
    """The batch as the teacher reads it: its own prompts, the same completion tokens."""
    return {**batch, "prompt_tokens": batch["teacher_prompt_tokens"], "prompt_mask": batch["teacher_prompt_mask"]}


def privileged_divergence(student, teacher, batch, kind: str, *, beta: float = 0.5, top_k: int = 0,
                          temperature: float = 1.0) -> jax.Array:
    """Per-token divergence float32[B, N] between the student's next-token distributions after
    the plain prompts and the teacher's (stop_gradient) after the privileged ones, over the same
    completion tokens; `scoring.completion_divergence` with a prompt per model."""
    t_batch = teacher_batch(batch)
    teacher_hidden = jax.lax.stop_gradient(scoring.completion_hidden(teacher, t_batch))
    teacher_head = jax.lax.stop_gradient(teacher.head())
    fn = lambda sh, th, sw, tw: token_divergence(sh, sw, th, tw, kind, beta=beta, top_k=top_k,  # noqa: E731
                                                 temperature=temperature)
    return scoring.batch_parallel(fn, (scoring.completion_hidden(student, batch), teacher_hidden),
                                  (student.head(), teacher_head))


def make_loss_fn(scfg, frozen_graphdefs):
    """(model, batch, frozen) -> (loss, metrics); frozen = (teacher state,) for a frozen or EMA
    teacher on the full-vocabulary losses, else None (the live teacher is the model itself)."""
    temperature = sampling.processors.scoring_temperature(scfg.sampling.temperature)
    clip = dict(clip_low=scfg.clip_low, clip_high=scfg.clip_high)

    def loss_fn(model, batch, frozen):
        mask = batch["mask"].astype(jnp.float32)
        sd_mask = mask * batch["sd_weight"]
        logp = None
        if scfg.loss in PG_LOSSES:
            logp = scoring.completion_logprobs(model, batch, temperature)
            sd_loss, _ = losses.clipped_surrogate(logp, batch["old_logp"], batch["advantages"], sd_mask, **clip)
            sd_sum = sd_loss * jnp.sum(sd_mask)
        else:
            teacher = model if frozen is None else nnx.merge(frozen_graphdefs[0], frozen[0])
            div = privileged_divergence(model, teacher, batch, scfg.loss, beta=scfg.beta,
                                        top_k=scfg.divergence_top_k, temperature=scfg.teacher_temperature)
            sd_sum = jnp.sum(aggregation.masked_values(div, sd_mask))
        metrics = {"sd_loss": aggregation.safe_divide(sd_sum, jnp.sum(sd_mask))}
        rl_mask = mask * batch["rl_weight"][:, None]
        rl_sum = 0.0
        if scfg.route == "srpo":
            if logp is None:
                logp = scoring.completion_logprobs(model, batch, temperature)
            rl_loss, _ = losses.clipped_surrogate(logp, batch["old_logp"], batch["rl_advantages"], rl_mask, **clip)
            rl_sum = rl_loss * jnp.sum(rl_mask)
            metrics["rl_loss"] = rl_loss
        loss = aggregation.safe_divide(sd_sum + rl_sum, jnp.sum(sd_mask) + jnp.sum(rl_mask))
        return loss, metrics

    return loss_fn


class EmaState(NamedTuple):
    inner: optax.OptState
    ema: optax.Params


def with_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """`tx` whose state also carries an exponential moving average of the parameters, updated
    with each applied update: ema <- decay ema + (1 - decay) (params + updates)."""
    def init(params):
        return EmaState(tx.init(params), jax.tree.map(jnp.copy, params))

    def update(updates, state, params):
        updates, inner = tx.update(updates, state.inner, params)
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new)
        return updates, EmaState(inner, ema)

    return optax.GradientTransformation(init, update)


def models(scfg) -> dict:
    """The policy (trained) and, for a frozen or EMA teacher, the teacher: the same model."""
    policy = scfg.get("init") or scfg.model
    return {"policy": policy} if scfg.teacher == "live" else {"policy": policy, "teacher": policy}


def frozen_roles(scfg) -> tuple:
    return ("teacher",) if scfg.teacher != "live" and scfg.loss in FULL_LOSSES else ()


def batch_spec(scfg, rows: int, prompt_len: int, completion: int) -> dict:
    spec = common.rollout_batch_spec(rows, prompt_len, completion, old_logp="token", advantages="token",
                                     sd_weight="token", rl_advantages="row", rl_weight="row")
    width = prompt_len + int(scfg.context_tokens)
    spec.update(teacher_prompt_tokens=((rows, width), jnp.int32), teacher_prompt_mask=((rows, width), bool))
    return spec


def check(name: str, scfg) -> None:
    for key, value, choices in (("context", scfg.context, CONTEXT_MODES), ("teacher", scfg.teacher, TEACHERS),
                                ("loss", scfg.loss, FULL_LOSSES + PG_LOSSES), ("route", scfg.route, ROUTES),
                                ("advantage_norm", scfg.advantage_norm, ("none", "whiten"))):
        if value not in choices:
            raise ValueError(f"Stage {name!r}: unknown {key} {value!r}; choose one of {choices}.")
    if scfg.teacher == "ema" and not 0.0 < scfg.ema_decay < 1.0:
        raise ValueError(f"Stage {name!r}: ema_decay must be in (0, 1), not {scfg.ema_decay}.")
    if int(scfg.context_tokens) < 1:
        raise ValueError(f"Stage {name!r}: context_tokens must be >= 1, not {scfg.context_tokens}.")


def attempts(task, roll: common.Rollout, group_size: int, with_results: bool) -> list[Attempt]:
    """Each completion as an Attempt: its text, its verifier result (recomputed with the
    extracted answer when `with_results`, else the score alone) and the first other correct
    completion of its group (SDPO's implicit feedback), "" when none."""
    correct = roll.correct
    out = []
    for b, (text, example) in enumerate(zip(roll.texts, roll.examples)):
        g = b - b % group_size
        peer = next((roll.texts[j] for j in range(g, g + group_size) if j != b and correct[j]), "")
        result = (task.reward(text, example, truncated=bool(roll.truncated[b])) if with_results else
                  RewardResult(float(roll.rewards[b]), bool(roll.format_ok[b]), None))
        out.append(Attempt(task.cut_at_stop(text), result, task.cut_at_stop(peer)))
    return out


def teacher_prompts(ctx, roll: common.Rollout, contexts: list[str], context_tokens: int) -> tuple:
    """Left-padded teacher prompt ids and mask [R, W]: each row's example with its context
    (`Task.teacher_example`); W is the student's prompt width plus the multiple of
    `context_tokens` the longest context needs (a few widths, so few compiles)."""
    ids = [ctx.task.prompt_ids(ctx.task.teacher_example(e, c), ctx.tokenizer) for e, c in zip(roll.examples, contexts)]
    plain = roll.prompt_tokens.shape[1]
    extra = max(0, max(len(x) for x in ids) - plain)
    width = plain + max(1, math.ceil(extra / context_tokens)) * context_tokens
    tokens = np.full((len(ids), width), ctx.pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for r, x in enumerate(ids):
        tokens[r, width - len(x):] = x
        mask[r, width - len(x):] = True
    return tokens, mask


def routes(scfg, rewards: np.ndarray, correct: np.ndarray, has_context: np.ndarray) -> tuple:
    """(distilled rows, GRPO rows, GRPO advantages), float32[R] each. Without routing every
    row with a context is distilled; with route="srpo" correct rows take GRPO with their
    group's advantages (`advantage` estimator over `sampling.n` samples) and only failed rows
    with a context are distilled."""
    has_context = np.asarray(has_context, np.float32)
    if scfg.route != "srpo":
        return has_context, np.zeros_like(has_context), np.zeros_like(has_context)
    rl_rows = np.asarray(correct, np.float32)
    estimator = adv_lib.advantage_estimator(scfg.advantage)
    adv = np.asarray(estimator(jnp.asarray(rewards, jnp.float32), int(scfg.sampling.n)), np.float32)
    return has_context * (1.0 - rl_rows), rl_rows, adv * rl_rows


def entropy_weights(entropy, mask, tau: float):
    """SRPO's entropy-aware weights (module docstring): exp(-H / tau) over the masked tokens,
    normalized to mean 1 there, 0 elsewhere."""
    logits = jnp.where(mask > 0, -entropy / tau, -jnp.inf)
    count = jnp.sum(mask > 0)
    return jnp.where(mask > 0, count * jax.nn.softmax(logits.reshape(-1)).reshape(entropy.shape), 0.0)


def make_trainer(ctx, kind, scfg, model, frozen_graphdefs, total_updates: int) -> common.Trainer:
    """`common.make_trainer`, with the EMA teacher carried in the optimizer state for "ema"."""
    wrap = (lambda tx: with_ema(tx, float(scfg.ema_decay))) if scfg.teacher == "ema" else (lambda tx: tx)
    return common.make_trainer(ctx, kind, scfg, model, frozen_graphdefs, total_updates, wrap)


def loop(ctx: runtime.Context, unit, scfg, kind) -> runtime.StageProgram:
    check(unit.id, scfg)
    ctx.task.check_context(scfg.context, ctx.task.examples("train"))
    model = ctx.model(models(scfg)["policy"])
    graphdef = nnx.split(model)[0]
    frozen_teacher = offload.frozen_copy(ctx, nnx.split(model)[1]) if scfg.teacher == "frozen" else None
    full = scfg.loss in FULL_LOSSES
    trainer = make_trainer(ctx, kind, scfg, model, (graphdef,) if frozen_roles(scfg) else (),
                           scfg.steps * scfg.epochs * scfg.minibatches)
    temperature = sampling.processors.scoring_temperature(scfg.sampling.temperature)
    slices = common.scoring_slices(scfg)
    score_student = jax.jit(scoring.in_slices(lambda s, b: scoring.completion_logprobs(
        nnx.merge(graphdef, s), b, temperature), slices))
    score_teacher = jax.jit(scoring.in_slices(lambda s, b: scoring.completion_logprobs(
        nnx.merge(graphdef, s), teacher_batch(b), scfg.teacher_temperature, return_entropy=True), slices))
    n = int(scfg.sampling.n)
    data = ctx.prompts(unit, scfg.prompts_per_step)

    def teacher_params(state):
        if scfg.teacher == "frozen":  # this step's device copy (parked: system.frozen_on_host)
            return offload.fetch(frozen_teacher)
        return state.opt_state.ema if scfg.teacher == "ema" else state.params

    def step(state, i):
        roll = common.sample_rollout(ctx, common.current_model(trainer, state), next(data).examples,
                                     scfg.sampling, seed=ctx.seed(unit, i, "sample"),
                                     chunk_prompts=scfg.sample_batch_size)
        tries = attempts(ctx.task, roll, n, with_results=scfg.context == "sdpo")
        contexts = [ctx.task.privileged_context(e, scfg.context, a) for e, a in zip(roll.examples, tries)]
        t_tokens, t_mask = teacher_prompts(ctx, roll, contexts, int(scfg.context_tokens))
        sd_rows, rl_rows, rl_adv = routes(scfg, roll.rewards, roll.correct, np.array([bool(c) for c in contexts]))
        batch, _ = common.place_rollout(ctx, roll)
        batch.update(runtime.place_batch(ctx, {"teacher_prompt_tokens": t_tokens, "teacher_prompt_mask": t_mask,
                                               "rl_weight": rl_rows, "rl_advantages": rl_adv, "sd_rows": sd_rows}))
        sd_mask = batch["mask"].astype(jnp.float32) * batch.pop("sd_rows")[:, None]
        old_logp = score_student(state.params, batch)
        teacher = teacher_params(state)
        teacher_logp, teacher_entropy = score_teacher(teacher, batch)
        sd_weight = (entropy_weights(teacher_entropy, sd_mask, float(scfg.entropy_tau)) if scfg.route == "srpo"
                     else sd_mask)
        adv = adv_lib.opd_token_advantages(old_logp, teacher_logp, scfg.coef)
        if scfg.advantage_norm == "whiten":
            adv = adv_lib.whiten(adv, sd_mask)
        batch.update(old_logp=old_logp, advantages=adv, sd_weight=sd_weight)
        metrics = common.response_metrics(roll)
        metrics.update(
            teacher_kl_sampled=float(losses.masked_mean(old_logp - teacher_logp, sd_mask)),
            teacher_entropy=float(losses.masked_mean(teacher_entropy, sd_mask)),
            route_sd_frac=float(sd_rows.mean()), route_rl_frac=float(rl_rows.mean()),
            context_tokens_mean=float(t_mask.sum(1).mean() - roll.prompt_mask.sum(1).mean()))
        if full and scfg.teacher == "ema":
            frozen = (jax.tree.map(jnp.copy, state.opt_state.ema),)  # the state is donated
        else:
            frozen = (teacher,) if frozen_roles(scfg) else None
        del teacher  # a parked teacher's device copy lives only while a program reads it
        state, update_metrics = common.run_updates(
            trainer, state, batch, frozen, epochs=scfg.epochs, num_minibatches=scfg.minibatches,
            rng=ctx.np_rng(unit, i, "minibatches"), tokens=float(roll.lengths.sum()))
        metrics.update(update_metrics)
        return state, metrics

    return runtime.StageProgram(trainer.graphdef, trainer.state, step, data)


KIND = StageKind(
    loop=loop,
    make_loss=make_loss_fn,
    batch_spec=batch_spec,
    microbatch_weight=microbatch_weight,
    models=models,
    frozen_roles=frozen_roles,
    update_rows=common.rollout_update_rows,
    sampling=common.rollout_sampling,
    scored_roles=lambda scfg: tuple(models(scfg)),
)
