"""On-policy distillation: the student samples, the teacher scores the same tokens.

Losses (config `loss`):
  "sampled_reverse_kl": policy gradient with dense per-token advantages
        A_t = -coef * (log p_S_old(y_t) - log p_pool(y_t))
      in the clipped surrogate (Agarwal et al. 2024, GKD; Thinking Machines OPD 2025);
  "exopd": A_t = lam * (log p_pool - log p_base) - (log p_S_old - log p_base), reward
      extrapolation (G-OPD/ExOPD); `base` is a model reference (the teacher's pre-RL base for
      G-OPD's reward correction; "" = the stage's initial student);
  "reverse_kl" | "forward_kl" | "jsd" | "forward_ce": full-vocabulary divergences on the
      student's rollouts through bridge.kernels.logprobs (divergence_top_k > 0: teacher top-k
      plus a tail bucket); "forward_ce" is DistIL's forward cross-entropy.

Several teachers (`teachers`, replacing the single `teacher`; `weights` w_k > 0 summing to 1,
uniform by default) are pooled as `teacher_pool` names:
  "geometric"   log p_pool = sum_k w_k log p_Tk (unnormalized product of experts). The
                sampled reward is then an unbiased estimate of sum_k w_k KL(S || T_k), which
                is KL(S || normalized pool) plus a constant; the full-vocabulary
                "reverse_kl" path minimizes exactly sum_k w_k KL(S || T_k).
  "arithmetic"  log p_pool = log sum_k w_k p_Tk (the mixture). The full-vocabulary
                "forward_kl" / "forward_ce" paths minimize sum_k w_k KL(T_k || S), which is
                KL(mixture || S) plus a constant.
With one teacher both pools are the teacher. Other (pool, full-vocabulary loss) pairs with
several teachers are refused at build time, so every path targets the pool it names.

advantage_norm="whiten" whitens the dense advantages over the batch (a per-batch baseline,
which tames the noisy raw reverse-KL rewards). tip_rule trains only the tokens TIP (token
importance in on-policy distillation) finds informative: "entropy" (high student entropy),
"q3" (low entropy and high teacher-student gap: overconfident and wrong) or "union".
tis_cap > 0 applies the truncated importance weight min(pi_old / pi_sample, cap) to the
advantages, as in the rl stage. Teacher logprobs are computed once per rollout batch and
reused by every epoch and minibatch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bridge import advantages as adv_lib, losses, offload, runtime, sampling, scoring
from bridge.stages import StageKind, common

PG_LOSSES = ("sampled_reverse_kl", "exopd")
FULL_LOSSES = ("reverse_kl", "forward_kl", "jsd", "forward_ce")
TEACHER_POOLS = ("geometric", "arithmetic")
POOL_OF_FULL_LOSS = {"reverse_kl": "geometric", "forward_kl": "arithmetic", "forward_ce": "arithmetic"}


MICROBATCH_WEIGHT = common.token_count("token_weight")  # every opd loss is a token mean


def pool_logprobs(teacher_logps, weights, pool: str):
    """log p_pool(y_t) [B, T] of the sampled tokens from each teacher's log p_Tk(y_t)."""
    if pool == "geometric":
        return sum(w * lp for w, lp in zip(weights, teacher_logps))
    if pool == "arithmetic":
        stacked = jnp.stack([jnp.log(w) + lp for w, lp in zip(weights, teacher_logps)])
        return jax.scipy.special.logsumexp(stacked, axis=0)
    raise ValueError(f"Unknown teacher_pool {pool!r}; choose one of {TEACHER_POOLS}.")


def teacher_refs(scfg) -> list[str]:
    """The teachers' model references: `teachers` when given, else the one `teacher`."""
    return list(scfg.get("teachers", ())) or [scfg.teacher]


def teacher_weights(name: str, scfg) -> list[float]:
    """The teachers' pool weights: given ones must be positive and sum to 1; default uniform."""
    count = len(teacher_refs(scfg))
    weights = [float(w) for w in scfg.get("weights", ())] or [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"Stage {name!r}: {count} teachers but {len(weights)} weights.")
    if min(weights) <= 0 or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"Stage {name!r}: teacher weights {weights} must be positive and sum to 1.")
    return weights


def make_loss_fn(scfg, teacher_graphdefs):
    temperature = sampling.processors.scoring_temperature(scfg.sampling.temperature)
    weights = teacher_weights("opd", scfg)

    def loss_fn(model, batch, frozen):
        mask = batch["mask"] * batch["token_weight"]
        if scfg.loss in PG_LOSSES:
            logp = scoring.completion_logprobs(model, batch, temperature)
            loss, metrics = losses.clipped_surrogate(logp, batch["old_logp"], batch["advantages"] * batch["tis_weight"],
                                                     mask, clip_low=scfg.clip_low, clip_high=scfg.clip_high)
            return loss, metrics
        div = 0.0
        for graphdef, state, w in zip(teacher_graphdefs, frozen, weights):
            div = div + w * scoring.completion_divergence(
                model, nnx.merge(graphdef, state), batch, scfg.loss, beta=scfg.beta, top_k=scfg.divergence_top_k,
                temperature=scfg.teacher_temperature)
        loss = losses.masked_mean(div, mask)
        return loss, {scfg.loss: loss}

    return loss_fn


def models(scfg) -> dict:
    """The policy (trained), the teachers (teacher_0, teacher_1, ...) and ExOPD's base."""
    out = {"policy": scfg.get("init") or scfg.model}
    out.update({f"teacher_{k}": ref for k, ref in enumerate(teacher_refs(scfg))})
    if scfg.loss == "exopd":
        out["base"] = scfg.get("base") or out["policy"]
    return out


def frozen_roles(scfg) -> tuple:
    """The full-vocabulary losses read the teachers' states inside the update step."""
    return tuple(r for r in models(scfg) if r.startswith("teacher_")) if scfg.loss in FULL_LOSSES else ()


def batch_spec(scfg, rows: int, prompt_len: int, completion: int) -> dict:
    return common.rollout_batch_spec(rows, prompt_len, completion, old_logp="token", advantages="token",
                                     token_weight="token", tis_weight="token")


def check(name: str, scfg) -> None:
    if scfg.loss not in PG_LOSSES + FULL_LOSSES:
        raise ValueError(f"Stage {name!r}: unknown opd loss {scfg.loss!r}; choose one of {PG_LOSSES + FULL_LOSSES}.")
    if scfg.advantage_norm not in ("none", "whiten"):
        raise ValueError(f"Stage {name!r}: advantage_norm must be 'none' or 'whiten', not {scfg.advantage_norm!r}.")
    teacher_weights(name, scfg)
    if scfg.teacher_pool not in TEACHER_POOLS:
        raise ValueError(f"Stage {name!r}: unknown teacher_pool {scfg.teacher_pool!r}; choose one of {TEACHER_POOLS}.")
    several = len(teacher_refs(scfg)) > 1
    if several and scfg.loss in FULL_LOSSES and POOL_OF_FULL_LOSS.get(scfg.loss) != scfg.teacher_pool:
        raise ValueError(f"Stage {name!r}: loss {scfg.loss!r} over several teachers does not target the "
                         f"{scfg.teacher_pool} pool; pairs that do: {POOL_OF_FULL_LOSS}.")


def loop(ctx: runtime.Context, unit, scfg, kind) -> runtime.StageProgram:
    check(unit.id, scfg)
    refs = models(scfg)
    weights = teacher_weights(unit.id, scfg)
    model = ctx.model(refs["policy"])
    teachers = [ctx.model(refs[r]) for r in refs if r.startswith("teacher_")]
    for t in teachers:
        common.check_vocab(t, model, unit.id)
        offload.park(ctx, t)  # system.frozen_on_host: in host memory between steps
    split = [nnx.split(t) for t in teachers]
    graphdefs, teacher_states = [g for g, _ in split], [s for _, s in split]
    if scfg.loss == "exopd":  # copied before the trainer takes (and donates) the student's buffers
        base_model = ctx.model(refs["base"])
        common.check_vocab(base_model, model, unit.id)
        base_graphdef, base_state = nnx.split(base_model)
        base_state = offload.frozen_copy(ctx, base_state)
    frozen = teacher_states if frozen_roles(scfg) else None
    trainer = common.make_trainer(ctx, kind, scfg, model, graphdefs if frozen else (),
                                  scfg.steps * scfg.epochs * scfg.minibatches)
    temperature = sampling.processors.scoring_temperature(scfg.sampling.temperature)
    slices = common.scoring_slices(scfg)
    score_student = jax.jit(scoring.in_slices(lambda s, b: scoring.completion_logprobs(
        nnx.merge(trainer.graphdef, s), b, temperature, return_entropy=True), slices))
    score_teachers = [jax.jit(scoring.in_slices(lambda s, b, g=g: scoring.completion_logprobs(
        nnx.merge(g, s), b, scfg.teacher_temperature), slices)) for g in graphdefs]
    if scfg.loss == "exopd":
        score_base = jax.jit(scoring.in_slices(lambda s, b: scoring.completion_logprobs(
            nnx.merge(base_graphdef, s), b, temperature), slices))
    data = ctx.prompts(unit, scfg.prompts_per_step)

    def step(state, i):
        roll = common.sample_rollout(ctx, common.current_model(trainer, state), next(data).examples,
                                     scfg.sampling, seed=ctx.seed(unit, i, "sample"),
                                     chunk_prompts=scfg.sample_batch_size)
        batch, sample_logp = common.place_rollout(ctx, roll)
        mask = batch["mask"].astype(jnp.float32)
        old_logp, entropy = score_student(state.params, batch)
        # the teachers in device memory for this step (parked in host memory: system.frozen_on_host),
        # kept past scoring only when the update reads them
        teachers_now = offload.fetch(teacher_states)
        teacher_logp = pool_logprobs([f(s, batch) for f, s in zip(score_teachers, teachers_now)], weights,
                                     scfg.teacher_pool)
        update_frozen = teachers_now if frozen else None
        del teachers_now
        gap = old_logp - teacher_logp  # sampled-token reverse KL estimate per token
        metrics = common.response_metrics(roll)
        metrics["teacher_reverse_kl_sampled"] = float(losses.masked_mean(gap, mask))
        metrics["entropy"] = float(losses.masked_mean(entropy, mask))
        if scfg.loss == "exopd":
            base_logp = score_base(offload.fetch(base_state), batch)
            adv = adv_lib.exopd_token_advantages(old_logp, teacher_logp, base_logp, scfg.lam)
        else:
            adv = adv_lib.opd_token_advantages(old_logp, teacher_logp, scfg.coef)
        if scfg.advantage_norm == "whiten":
            adv = adv_lib.whiten(adv, mask)
        token_weight = jnp.ones_like(mask)
        if scfg.tip_rule:
            token_weight = adv_lib.tip_token_weights(
                entropy, gap, mask, rule=scfg.tip_rule, keep_fraction=scfg.tip_keep_fraction,
                entropy_quantile=scfg.tip_entropy_quantile, divergence_quantile=scfg.tip_divergence_quantile)
            metrics["tip_kept_frac"] = float(losses.masked_mean(token_weight, mask))
        tis = common.tis_weight(old_logp, sample_logp, scfg.tis_cap)
        metrics.update(common.mismatch_metrics(old_logp, sample_logp, tis, mask))
        batch.update(old_logp=old_logp, advantages=adv, token_weight=token_weight, tis_weight=tis)
        state, update_metrics = common.run_updates(
            trainer, state, batch, update_frozen, epochs=scfg.epochs, num_minibatches=scfg.minibatches,
            rng=ctx.np_rng(unit, i, "minibatches"), tokens=float(roll.lengths.sum()))
        metrics.update(update_metrics)
        return state, metrics

    return runtime.StageProgram(trainer.graphdef, trainer.state, step, data)


KIND = StageKind(
    loop=loop,
    make_loss=make_loss_fn,
    batch_spec=batch_spec,
    microbatch_weight=lambda scfg: MICROBATCH_WEIGHT,
    models=models,
    frozen_roles=frozen_roles,
    update_rows=common.rollout_update_rows,
    sampling=common.rollout_sampling,
    scored_roles=lambda scfg: tuple(models(scfg)),
)
