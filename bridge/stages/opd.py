"""On-policy distillation: the student samples, the teacher scores the same tokens.

Losses (config `loss`):
  "sampled_reverse_kl": policy gradient with dense per-token advantages
        A_t = -coef * (log p_S_old(y_t) - sum_k w_k log p_Tk(y_t))
      in the clipped surrogate (Agarwal et al. 2024, GKD; Thinking Machines OPD 2025);
  "exopd": A_t = lam * (log p_T - log p_base) - (log p_S_old - log p_base), reward
      extrapolation (G-OPD/ExOPD), base = the stage's initial student;
  "reverse_kl" | "forward_kl" | "jsd" | "forward_ce": full-vocabulary divergences on the
      student's rollouts through kernels.logprobs (top_k > 0: teacher top-k plus a tail
      bucket); "forward_ce" is DistIL's forward cross-entropy.
advantage_norm="whiten" whitens the dense advantages over the batch (a per-batch baseline,
which tames the noisy raw reverse-KL rewards). tip_keep_fraction > 0 trains only the most
important tokens by student entropy x teacher-student gap (TIP). Teacher logprobs are
computed once per rollout batch and reused by every epoch and minibatch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bridge import advantages as adv_lib, losses, runtime, scoring
from bridge.stages import common

PG_LOSSES = ("sampled_reverse_kl", "exopd")
FULL_LOSSES = ("reverse_kl", "forward_kl", "jsd", "forward_ce")


MICROBATCH_WEIGHT = common.token_count("token_weight")  # every opd loss is a token mean


def make_loss_fn(scfg, teacher_graphdefs, weights):
    temperature = scfg.temperature if scfg.temperature > 0 else 1.0

    def loss_fn(model, batch, frozen):
        mask = batch["mask"] * batch["token_weight"]
        if scfg.loss in PG_LOSSES:
            logp = scoring.completion_logprobs(model, batch, temperature)
            loss, metrics = losses.clipped_surrogate(logp, batch["old_logp"], batch["advantages"], mask,
                                                     clip_low=scfg.clip_low, clip_high=scfg.clip_high)
            return loss, metrics
        div = 0.0
        for graphdef, state, w in zip(teacher_graphdefs, frozen, weights):
            div = div + w * scoring.completion_divergence(
                model, nnx.merge(graphdef, state), batch, scfg.loss, beta=scfg.beta, top_k=scfg.top_k,
                temperature=scfg.teacher_temperature)
        loss = losses.masked_mean(div, mask)
        return loss, {"divergence": loss}

    return loss_fn


def build(ctx: runtime.Context, name: str, scfg) -> runtime.StageProgram:
    if scfg.loss not in PG_LOSSES + FULL_LOSSES:
        raise ValueError(f"Stage {name!r}: unknown opd loss {scfg.loss!r}; choose one of {PG_LOSSES + FULL_LOSSES}.")
    if scfg.advantage_norm not in ("none", "whiten"):
        raise ValueError(f"Stage {name!r}: advantage_norm must be 'none' or 'whiten', not {scfg.advantage_norm!r}.")
    model = ctx.model(scfg.get("init") or scfg.model)
    refs = [scfg.teacher] + list(scfg.get("extra_teachers", ()))
    weights = list(scfg.get("teacher_weights", ())) or [1.0 / len(refs)] * len(refs)
    if len(weights) != len(refs):
        raise ValueError(f"Stage {name!r}: {len(refs)} teachers but {len(weights)} teacher_weights.")
    teachers = [ctx.model(r) for r in refs]
    for t in teachers:
        common.check_vocab(t, model, name)
    split = [nnx.split(t) for t in teachers]
    graphdefs, teacher_states = [g for g, _ in split], [s for _, s in split]
    trainer = common.make_trainer(ctx, model, scfg.optimizer, make_loss_fn(scfg, graphdefs, weights),
                                  scfg.steps * scfg.epochs * scfg.minibatches, microbatches=scfg.microbatches,
                                  microbatch_weight=MICROBATCH_WEIGHT)
    base_state = jax.tree.map(jnp.copy, nnx.split(model)[1]) if scfg.loss == "exopd" else None
    temperature = scfg.temperature if scfg.temperature > 0 else 1.0
    slices = common.scoring_slices(scfg)
    score_student = jax.jit(scoring.in_slices(lambda s, b: scoring.completion_logprobs(
        nnx.merge(trainer.graphdef, s), b, temperature, return_entropy=True), slices))
    score_teachers = [jax.jit(scoring.in_slices(lambda s, b, g=g: scoring.completion_logprobs(
        nnx.merge(g, s), b, scfg.teacher_temperature), slices)) for g in graphdefs]
    data = ctx.prompts(name, scfg.prompts_per_step)

    def step(state, i):
        rng = ctx.stage_rng(name, i)
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        roll = common.sample_rollout(ctx, common.current_model(trainer, state), next(data).examples,
                                     n=scfg.group_size, temperature=scfg.temperature, top_p=scfg.top_p,
                                     top_k=scfg.top_k_sampling, max_new_tokens=scfg.max_new_tokens, seed=seed,
                                     chunk_prompts=scfg.sample_batch_size)
        batch = runtime.place_batch(ctx, {k: roll[k] for k in common.ARRAY_KEYS})
        mask = batch["mask"].astype(jnp.float32)
        old_logp, entropy = score_student(state.params, batch)
        teacher_logp = sum(w * f(s, batch) for f, s, w in zip(score_teachers, teacher_states, weights))
        gap = old_logp - teacher_logp  # sampled-token reverse KL estimate per token
        metrics = common.response_metrics(roll)
        metrics["teacher_kl"] = float(losses.masked_mean(gap, mask))
        metrics["entropy"] = float(losses.masked_mean(entropy, mask))
        if scfg.loss == "exopd":
            base_logp = score_student(base_state, batch)[0]
            adv = adv_lib.exopd_token_advantages(old_logp, teacher_logp, base_logp, scfg.lam)
        else:
            adv = adv_lib.opd_token_advantages(old_logp, teacher_logp, scfg.coef)
        if scfg.advantage_norm == "whiten":
            adv = adv_lib.whiten(adv, mask)
        token_weight = jnp.ones_like(mask)
        if scfg.tip_keep_fraction > 0:
            token_weight = adv_lib.tip_token_weights(entropy, gap, mask, scfg.tip_alpha, scfg.tip_gamma,
                                                     scfg.tip_keep_fraction).astype(jnp.float32)
        batch.update(old_logp=old_logp, advantages=adv, token_weight=token_weight)
        state, update_metrics = common.run_updates(
            trainer, state, batch, teacher_states, epochs=scfg.epochs, num_minibatches=scfg.minibatches,
            seed=(int(ctx.cfg.seed), i), tokens=float(roll["lengths"].sum()))
        metrics.update(update_metrics)
        return state, metrics

    return runtime.StageProgram(trainer.graphdef, trainer.state, step, data, slot=scfg.model)
