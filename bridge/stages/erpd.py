"""ERPD: Extreme Region Policy Distillation, as two stage kinds on one fixed rollout batch.

Stage 1, `erpd_teacher` (the extreme-region teacher). At its start the stage samples ONE
batch from its initial policy pi_old (`prompts_per_step` prompts x `sampling.n`), scores it with the
verifier and with pi_old, and publishes it as the artifact "batch". A copy of pi_old then
trains for `steps` updates (each on 1/`minibatches` of it, reshuffled every epoch) on that
batch alone, with `teacher_loss`:
    "grpo"  clipped surrogate, group-normalized advantages, clip (clip_low, clip_high)
    "sapo"  SAPO's soft gate (tau_pos, tau_neg)
    "ce"    implicit-PRM cross-entropy: z = beta * agg_t log(pi / pi_old), BCE(sigmoid(z), correct)
    "mse"   the implicit reward z regressed on the verifier reward (the "unlearned" regime)
    "ppo"   PPO with a value model (`critic` sub-config, `stages.critic`): before each update
            the critic scores the update's rows, GAE gives per-token advantages, and the loss
            is the clipped surrogate (clip_low, clip_high) plus the clipped value loss
with `aggregation` "sum" or "mean" over tokens for z, and an optional KL loss to pi_old
(k3, `kl_coef`). After its first update and every `track_every` updates it scores the whole batch: k3 KL(pi_old || pi),
token entropy, the mean log-probability of correct and of wrong samples (the
unlearn-and-recover dynamics) and, for "mse", the explained variance of the fit. After the
updates listed in `snapshot_steps` it publishes the model as artifact "step<k>" (strategy 2's
early "unlearned" checkpoint).

Stage 2, `erpd_distill` (trust-region distillation). pi_old (the stage's initial policy)
trains for a few updates on the same batch (`batch`, an artifact reference) with the clipped
surrogate whose per-token advantage is a reward whitened over the batch:
    s1  log pi_T(y_t)    - log pi_old(y_t)      teacher against the rollout policy
    s2  log pi_T(y_t)    - log pi_unlearned(y_t) (MSE teacher against its early snapshot)
    s3  log pi_old(y_t)  - log pi_weak(y_t)      push away from a weak policy
`strategies` with `weights` > 1 entry is the ensemble sum_i w_i whiten(r_i) / sum_i w_i
(`advantages.ensemble_rewards`). denominator="current" replaces pi_old by the evolving
policy in s1 (recomputed every update: the KL-friendlier option). Optional KL loss to pi_old
(`kl_coef`, k3) and entropy bonus (`entropy_coef`). The models in the rewards are scored
once on the fixed batch and reused (the offline teacher-logprob cache).

Paper: "Extreme Region Policy Distillation" (ERPD). An ERPD round is a repeated block
(`runtime`): teacher then distill, the next round's teacher starting from this round's student.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge import advantages as adv_lib, distributed, losses, offload, runtime, sampling, scoring
from bridge.models import value
from bridge.stages import StageKind, common, critic

TEACHER_LOSSES = ("grpo", "sapo", "ce", "mse", "ppo")
STRATEGIES = {"s1": ("teacher", "old"), "s2": ("teacher", "unlearned"), "s3": ("old", "weak")}
TEACHER_ROLES = ("teacher", "unlearned", "weak")  # model roles a strategy may name


def _temperature(scfg) -> float:
    return sampling.processors.scoring_temperature(scfg.sampling.temperature)


def _scorer(graphdef, temperature: float, slices: int, entropy: bool = False):
    return jax.jit(scoring.in_slices(lambda state, batch: scoring.completion_logprobs(
        nnx.merge(graphdef, state), batch, temperature, return_entropy=entropy), slices))


def _implicit_reward_mask(mask, aggregation: str):
    """Token weights of the implicit reward z: 1 (sum over tokens) or 1/|y| (mean)."""
    mask = mask.astype(jnp.float32)
    if aggregation == "sum":
        return mask
    return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)


# ---- stage 1: the extreme-region teacher --------------------------------------------------------


def teacher_loss(scfg, frozen_graphdefs=()):
    """(model, batch, frozen) -> (loss, metrics) for `teacher_loss` on the fixed batch."""
    temperature = _temperature(scfg)

    def loss_fn(model, batch, frozen):
        logp, _, values = critic.train_scores(model, batch, temperature, entropy=False,
                                              critic=uses_critic(scfg))
        mask = batch["mask"]
        if scfg.teacher_loss in ("grpo", "ppo"):
            loss, metrics = losses.clipped_surrogate(logp, batch["old_logp"], batch["advantages"], mask,
                                                     clip_low=scfg.clip_low, clip_high=scfg.clip_high)
        elif scfg.teacher_loss == "sapo":
            loss, metrics = losses.sapo_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                             tau_pos=scfg.tau_pos, tau_neg=scfg.tau_neg)
        elif scfg.teacher_loss == "ce":
            loss, metrics = losses.implicit_prm_ce_loss(logp, batch["old_logp"],
                                                        _implicit_reward_mask(mask, scfg.aggregation),
                                                        batch["rewards"] >= 1.0, beta=scfg.beta)
        else:
            loss, metrics = losses.mse_reward_loss(logp, batch["old_logp"], _implicit_reward_mask(mask, scfg.aggregation),
                                                   batch["rewards"], beta=scfg.beta)
        metrics = dict(metrics)
        if values is not None:
            value_loss, value_metrics = critic.value_term(scfg.critic, values, batch, mask)
            loss = loss + value_loss
            metrics.update(value_metrics)
        if "accuracy" in metrics:  # the implicit reward's sign against the verifier, not task accuracy
            metrics["implicit_reward_accuracy"] = metrics.pop("accuracy")
        if scfg.kl_coef > 0:
            kl = losses.masked_mean(losses.kl_estimate(logp, batch["old_logp"], "k3"), mask)
            loss = loss + scfg.kl_coef * kl
            metrics["kl_old"] = kl
        return loss, metrics

    return loss_fn


def uses_critic(scfg) -> bool:
    return scfg.teacher_loss == "ppo"


def teacher_batch_spec(scfg, rows: int, prompt_len: int, completion: int) -> dict:
    if uses_critic(scfg):
        return common.rollout_batch_spec(rows, prompt_len, completion, old_logp="token", advantages="token",
                                         rewards="row", old_values="token", returns="token")
    return common.rollout_batch_spec(rows, prompt_len, completion, old_logp="token", advantages="row", rewards="row")


def fixed_batch(ctx: runtime.Context, unit, scfg, model) -> dict:
    """The unit's fixed batch (host arrays): sampled from `model` once and published as
    artifact "batch"; a resumed run reads it back."""
    try:
        return ctx.artifact(f"artifact:{unit.id}/batch")
    except ValueError:
        pass
    examples = next(ctx.prompts(unit, int(scfg.prompts_per_step))).examples
    roll = common.sample_rollout(ctx, model, examples, scfg.sampling, seed=ctx.seed(unit, 0, "sample"),
                                 chunk_prompts=scfg.sample_batch_size)
    placed, _ = common.place_rollout(ctx, roll)
    graphdef, state = nnx.split(model)
    old_logp = _scorer(graphdef, _temperature(scfg), common.scoring_slices(scfg))(offload.fetch(state), placed)
    batch = {**roll.token_arrays(), "old_logp": distributed.to_host(old_logp), "rewards": roll.rewards,
             "advantages": np.asarray(adv_lib.group_advantages(roll.rewards, int(scfg.sampling.n)))}
    ctx.publish(unit, "batch", batch)
    return batch


def k3_kl(logp, old_logp, mask) -> float:
    """Schulman's k3 estimate of KL(pi_old || pi) per token on pi_old's samples (float64)."""
    mask = np.asarray(mask, np.float64)
    log_ratio = np.where(mask > 0, np.asarray(logp, np.float64) - np.asarray(old_logp, np.float64), 0.0)
    return float(((np.exp(log_ratio) - 1 - log_ratio) * mask).sum() / mask.sum())


def batch_statistics(logp, entropy, batch, old_logp) -> dict:
    """What the teacher stage tracks on the whole fixed batch (see the module docstring)."""
    mask = np.asarray(batch["mask"], np.float64)
    logp, entropy = np.asarray(logp, np.float64), np.asarray(entropy, np.float64)
    log_ratio = np.where(mask > 0, logp - np.asarray(old_logp, np.float64), 0.0)
    correct = np.asarray(batch["rewards"]) >= 1.0
    per_row = (logp * mask).sum(1) / np.maximum(mask.sum(1), 1)

    out = {"kl_old_k3": float(((np.exp(log_ratio) - 1 - log_ratio) * mask).sum() / mask.sum()),
           "batch_entropy": float((entropy * mask).sum() / mask.sum())}
    for name, rows in (("logp_correct", correct), ("logp_wrong", ~correct)):
        if rows.any():  # mean per-token log-probability of the batch's correct / wrong samples
            out[name] = float(per_row[rows].mean())
    return out


def check_teacher(name: str, scfg) -> None:
    if scfg.teacher_loss not in TEACHER_LOSSES:
        raise ValueError(f"Stage {name!r}: unknown teacher_loss {scfg.teacher_loss!r}; choose one of {TEACHER_LOSSES}.")
    if scfg.aggregation not in ("sum", "mean"):
        raise ValueError(f"Stage {name!r}: aggregation must be 'sum' or 'mean', not {scfg.aggregation!r}.")
    if uses_critic(scfg):
        critic.check(name, scfg.critic)


def teacher_loop(ctx: runtime.Context, unit, scfg, kind) -> runtime.StageProgram:
    check_teacher(unit.id, scfg)
    model = ctx.model(scfg.get("init") or scfg.model)
    batch = fixed_batch(ctx, unit, scfg, model)
    trainer = common.make_trainer(ctx, kind, scfg, model, (), scfg.steps)
    rows, bs = len(batch["tokens"]), common.rollout_update_rows(scfg)
    slices = common.scoring_slices(scfg)
    score = jax.jit(scoring.in_slices(lambda params, b: scoring.completion_logprobs(
        value.policy_of(nnx.merge(trainer.graphdef, params)), b, _temperature(scfg), return_entropy=True), slices))
    score_values = critic.value_scorer(trainer.graphdef, int(scfg.microbatches)) if uses_critic(scfg) else None
    keys = (*common.Rollout.TOKEN_KEYS, "old_logp", "advantages", "rewards")
    snapshots = {int(s) for s in scfg.snapshot_steps}

    def step(state, i):
        idx = common.pool_rows(ctx, unit, i, rows, bs)
        minibatch = runtime.place_batch(ctx, {k: batch[k][idx] for k in keys})
        critic_metrics = {}
        if score_values is not None:  # PPO: the critic's values of these rows now, and their GAE
            old_values = score_values(state.params, minibatch)
            adv, returns, critic_metrics = critic.advantages(
                scfg.critic, minibatch["rewards"], old_values, minibatch["mask"], minibatch["mask"].sum(1),
                step=i, total=int(scfg.steps))
            minibatch.update(advantages=adv, old_values=old_values, returns=returns)
        state, metrics = trainer.update(state, minibatch, None)
        metrics = dict(metrics, epoch=float(i * bs // rows), **critic_metrics)
        if _tracked(scfg, i):
            whole = runtime.place_batch(ctx, {k: batch[k] for k in common.Rollout.TOKEN_KEYS})
            logp, entropy = distributed.to_host(score(state.params, whole))
            metrics.update(batch_statistics(logp, entropy, batch, batch["old_logp"]))
            if scfg.teacher_loss == "mse":
                weights = np.asarray(_implicit_reward_mask(jnp.asarray(batch["mask"]), scfg.aggregation))
                z = scfg.beta * ((np.asarray(logp) - batch["old_logp"]) * weights).sum(1)
                metrics["explained_variance"] = critic.explained_variance(z, batch["rewards"])
        if i + 1 in snapshots:
            ctx.publish(unit, f"step{i + 1}", common.current_model(trainer, state))
        return state, metrics

    return runtime.StageProgram(trainer.graphdef, trainer.state, step, None)


def _tracked(scfg, i: int) -> bool:
    """Whether update i (0-based) scores the whole batch: the first (so its programs compile in
    the stage's first step), every `track_every`-th and the last."""
    return i == 0 or (i + 1) % int(scfg.track_every) == 0 or i + 1 == int(scfg.steps)


TEACHER = StageKind(
    loop=teacher_loop,
    make_loss=teacher_loss,
    batch_spec=teacher_batch_spec,
    microbatch_weight=lambda scfg: common.token_count(),
    models=lambda scfg: {"policy": scfg.get("init") or scfg.model},
    frozen_roles=lambda scfg: (),
    update_rows=common.rollout_update_rows,
    sampling=common.rollout_sampling,
    rollouts=lambda cfg, scfg, steps: int(scfg.prompts_per_step) * int(scfg.sampling.n),  # one fixed batch
    scored_roles=lambda scfg: ("policy",),
    trained=critic.trained_module(uses_critic),
    policy_of=value.policy_of,
)


# ---- stage 2: trust-region distillation ---------------------------------------------------------


def distill_models(scfg) -> dict:
    """The policy and the models the strategies read (teacher, unlearned, weak) by role."""
    out = {"policy": scfg.get("init") or scfg.model}
    for strategy in scfg.strategies:
        for side in STRATEGIES[strategy]:
            if side in TEACHER_ROLES:
                if not scfg.get(side):
                    raise ValueError(f"ERPD strategy {strategy!r} reads the {side!r} model; set `{side}`.")
                out[side] = scfg[side]
    return out


def check_distill(name: str, scfg) -> None:
    unknown = [s for s in scfg.strategies if s not in STRATEGIES]
    if unknown or not scfg.strategies:
        raise ValueError(f"Stage {name!r}: strategies {tuple(scfg.strategies)}; choose from {sorted(STRATEGIES)}.")
    if scfg.weights and len(scfg.weights) != len(scfg.strategies):
        raise ValueError(f"Stage {name!r}: {len(scfg.strategies)} strategies but {len(scfg.weights)} weights.")
    if scfg.denominator not in ("old", "current"):
        raise ValueError(f"Stage {name!r}: denominator must be 'old' or 'current', not {scfg.denominator!r}.")
    distill_models(scfg)


def strategy_rewards(logps: dict, mask, strategies, weights=()):
    """Per-token advantages [B, T] from the models' log-probabilities of the batch tokens:
    whiten(log p_pos - log p_neg) for one strategy, the weighted mean of whitened signals for
    several (`advantages.ensemble_rewards`). `logps` maps "teacher", "old", "unlearned",
    "weak" (those the strategies name) to float[B, T]."""
    signals = [logps[STRATEGIES[s][0]] - logps[STRATEGIES[s][1]] for s in strategies]
    if len(signals) == 1:
        return adv_lib.whiten(signals[0], mask)
    return adv_lib.ensemble_rewards(signals, list(weights) or None, mask)


def distill_loss(scfg, frozen_graphdefs=()):
    temperature = _temperature(scfg)

    def loss_fn(model, batch, frozen):
        mask = batch["mask"]
        if scfg.entropy_coef:
            logp, ent = scoring.completion_logprobs(model, batch, temperature, return_entropy=True)
        else:
            logp = scoring.completion_logprobs(model, batch, temperature)
        loss, metrics = losses.clipped_surrogate(logp, batch["old_logp"], batch["advantages"], mask,
                                                 clip_low=scfg.clip_low, clip_high=scfg.clip_high)
        metrics = dict(metrics)
        if scfg.kl_coef > 0:
            kl = losses.masked_mean(losses.kl_estimate(logp, batch["old_logp"], "k3"), mask)
            loss = loss + scfg.kl_coef * kl
            metrics["kl_old"] = kl
        if scfg.entropy_coef:
            bonus = losses.masked_mean(ent, mask)
            loss = loss - scfg.entropy_coef * bonus
            metrics["entropy_bonus"] = bonus
        return loss, metrics

    return loss_fn


def distill_batch_spec(scfg, rows: int, prompt_len: int, completion: int) -> dict:
    return common.rollout_batch_spec(rows, prompt_len, completion, old_logp="token", advantages="token")


def distill_loop(ctx: runtime.Context, unit, scfg, kind) -> runtime.StageProgram:
    check_distill(unit.id, scfg)
    refs = distill_models(scfg)
    model = ctx.model(refs["policy"])
    batch = dict(ctx.artifact(scfg.batch))
    slices = common.scoring_slices(scfg)
    temperature = _temperature(scfg)
    placed = runtime.place_batch(ctx, {k: batch[k] for k in common.Rollout.TOKEN_KEYS})
    graphdef, state = nnx.split(model)
    logps = {"old": _scorer(graphdef, temperature, slices)(offload.fetch(state), placed)}  # this stage's pi_old
    for role in (r for r in refs if r != "policy"):  # the offline cache: each model scored once
        other = ctx.model(refs[role])
        common.check_vocab(other, model, unit.id)
        other_graphdef, other_state = nnx.split(other)
        logps[role] = _scorer(other_graphdef, temperature, slices)(offload.fetch(other_state), placed)
        offload.park(ctx, other)  # system.frozen_on_host: not read again in this stage
    mask = placed["mask"].astype(jnp.float32)
    batch["old_logp"], batch["advantages"] = distributed.to_host(
        (logps["old"], strategy_rewards(logps, mask, scfg.strategies, scfg.weights)))
    cached = distributed.to_host({r: v for r, v in logps.items() if r != "old"}) if scfg.denominator == "current" else {}
    trainer = common.make_trainer(ctx, kind, scfg, model, (), scfg.steps)
    score = _scorer(trainer.graphdef, temperature, slices)
    rows, bs = len(batch["tokens"]), common.rollout_update_rows(scfg)
    keys = (*common.Rollout.TOKEN_KEYS, "old_logp", "advantages")
    def step(state, i):
        idx = common.pool_rows(ctx, unit, i, rows, bs)
        minibatch = runtime.place_batch(ctx, {k: batch[k][idx] for k in keys})
        if scfg.denominator == "current":  # s1 against the evolving policy, whitened on the minibatch
            current = {**runtime.place_batch(ctx, {r: v[idx] for r, v in cached.items()}),
                       "old": score(state.params, minibatch)}
            minibatch["advantages"] = strategy_rewards(current, minibatch["mask"].astype(jnp.float32),
                                                       scfg.strategies, scfg.weights)
        state, metrics = trainer.update(state, minibatch, None)
        metrics = dict(metrics)
        if _tracked(scfg, i):
            logp = np.asarray(distributed.to_host(score(state.params, placed)), np.float64)
            m = np.asarray(batch["mask"], np.float64)
            gain = (np.asarray(batch["advantages"]) * (logp - batch["old_logp"]) * m).sum() / m.sum()
            metrics.update(surrogate_gain=float(gain), kl_old_k3=k3_kl(logp, batch["old_logp"], m))
        return state, metrics

    return runtime.StageProgram(trainer.graphdef, trainer.state, step, None)


DISTILL = StageKind(
    loop=distill_loop,
    make_loss=distill_loss,
    batch_spec=distill_batch_spec,
    microbatch_weight=lambda scfg: common.token_count(),
    models=distill_models,
    frozen_roles=lambda scfg: (),
    update_rows=common.rollout_update_rows,
    sampling=lambda scfg: None,
    scored_roles=lambda scfg: tuple(distill_models(scfg)),
)
