"""RL with verifiable rewards: GRPO and its family, chosen by config.

One step: sample `group_size` completions for each of `prompts_per_step` prompts, reward
them with the task verifier, turn rewards into advantages, then `epochs` x `minibatches`
optimizer updates of the policy surrogate against the stored old logprobs.

| config                         | paper                                  |
|--------------------------------|----------------------------------------|
| loss=grpo, advantage=grpo      | GRPO (Shao et al. 2024)                |
| clip_high=0.28, token-mean,    | DAPO (Yu et al. 2025): clip-higher,    |
|   dynamic_sampling, overlong   |   dynamic sampling, overlong shaping   |
| advantage=drgrpo,              | Dr. GRPO (Liu et al. 2025)             |
|   seq-mean-token-sum-norm      |                                        |
| loss=gspo / sapo / cispo       | GSPO, SAPO, CISPO (MiniMax-M1)         |
| advantage=rloo                 | RLOO (Ahmadian et al. 2024)            |

KL to the stage's initial policy (the reference) is a loss term (kl_mode="loss") or a
per-sequence reward penalty (kl_mode="reward"), with estimator k1/k2/k3; kl_coef=0 keeps no
reference copy. tis_cap > 0 multiplies each token's advantage by min(pi_old/pi_sample, cap),
the truncated importance correction for sampler/trainer mismatch (Yao et al. 2025).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge import advantages as adv_lib, losses, runtime, scoring, train_state
from bridge.stages import common
from bridge.tasks import soft_overlong_penalty


def microbatch_weight(scfg):
    """Weight of a micro-batch in the accumulated gradient: tokens for token-mean, else rows."""
    return common.token_count("row_weight") if scfg.aggregation == "token-mean" else train_state.rows


def make_loss_fn(scfg):
    """(model, batch, frozen) -> (loss, metrics): surrogate + KL term - entropy bonus."""
    policy = losses.policy_loss(scfg.loss, **scfg.loss_kwargs.to_dict())
    mode, max_len = scfg.aggregation, scfg.get("max_len") or None
    temperature = scfg.temperature if scfg.temperature > 0 else 1.0

    def loss_fn(model, batch, frozen):
        # The entropy (and its gradient) is computed here only when it is a loss term; the
        # reported entropy comes from the old-logprob pass, outside the differentiated step.
        if scfg.entropy_coef:
            logp, ent = scoring.completion_logprobs(model, batch, temperature, return_entropy=True)
        else:
            logp = scoring.completion_logprobs(model, batch, temperature)
        mask = batch["mask"] * batch["row_weight"][:, None]
        adv = batch["advantages"][:, None] * batch["tis_weight"]
        loss, metrics = policy(logp, batch["old_logp"], adv, mask, aggregation=mode, max_len=max_len)
        if scfg.kl_coef > 0 and scfg.kl_mode == "loss":
            kl = losses.aggregate(losses.kl_estimate(logp, batch["ref_logp"], scfg.kl_kind), mask, mode, max_len)
            loss = loss + scfg.kl_coef * kl
            metrics["kl_ref"] = kl
        if scfg.entropy_coef:
            loss = loss - scfg.entropy_coef * losses.aggregate(ent, mask, mode, max_len)
            metrics["entropy_bonus"] = losses.masked_mean(ent, mask)
        return loss, metrics

    return loss_fn


def shaped_rewards(rollout: dict, scfg) -> np.ndarray:
    """Verifier rewards plus DAPO's soft overlong penalty when overlong_buffer > 0."""
    rewards = rollout["rewards"].copy()
    if scfg.overlong_buffer > 0:
        rewards += scfg.overlong_penalty * np.array(
            [soft_overlong_penalty(int(n), scfg.max_new_tokens, scfg.overlong_buffer)
             for n in rollout["lengths"]], np.float32)
    return rewards


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """bool[G]: groups whose rewards are not all equal (DAPO's dynamic-sampling filter)."""
    grouped = rewards.reshape(-1, group_size)
    return grouped.max(axis=1) > grouped.min(axis=1)


def collect(ctx, model, data, scfg, rng: jax.Array) -> tuple[dict, np.ndarray]:
    """Rollouts for one step and a row weight [R] (0 on groups DAPO's filter drops).

    Without dynamic sampling: one batch of prompts. With it: keeps drawing prompt batches
    (up to max_refills more) until prompts_per_step informative groups are found; if they
    are not, uninformative groups fill the batch with weight 0, so shapes stay fixed.
    """
    n = scfg.group_size
    kept, spare = [], []
    for attempt in range(1 + (scfg.max_refills if scfg.dynamic_sampling else 0)):
        examples = next(data).examples
        seed = int(jax.random.randint(jax.random.fold_in(rng, attempt), (), 0, 2**31 - 1))
        roll = common.sample_rollout(ctx, model, examples, n=n, temperature=scfg.temperature,
                                     top_p=scfg.top_p, top_k=scfg.top_k, max_new_tokens=scfg.max_new_tokens,
                                     seed=seed, chunk_prompts=scfg.sample_batch_size)
        roll["rewards_shaped"] = shaped_rewards(roll, scfg)
        if not scfg.dynamic_sampling:
            return roll, np.ones(len(roll["rewards"]), np.float32)
        good = informative_groups(roll["rewards_shaped"], n)
        for g, ok in enumerate(good):
            (kept if ok else spare).append(_group(roll, g, n))
        if len(kept) >= scfg.prompts_per_step:
            break
    groups = (kept + spare)[: scfg.prompts_per_step]
    weight = np.repeat([1.0 if i < len(kept) else 0.0 for i in range(len(groups))], n).astype(np.float32)
    return common.concat_rollouts(groups), weight


def _group(roll: dict, g: int, n: int) -> dict:
    sl = slice(g * n, (g + 1) * n)
    return {k: (v[sl] if isinstance(v, (np.ndarray, list)) else v) for k, v in roll.items()}


def build(ctx: runtime.Context, name: str, scfg) -> runtime.StageProgram:
    if scfg.kl_mode not in ("loss", "reward"):
        raise ValueError(f"Stage {name!r}: kl_mode must be 'loss' or 'reward', not {scfg.kl_mode!r}.")
    model = ctx.model(scfg.get("init") or scfg.model)
    updates = scfg.steps * scfg.epochs * scfg.minibatches
    trainer = common.make_trainer(ctx, model, scfg.optimizer, make_loss_fn(scfg), updates,
                                  microbatches=scfg.microbatches, microbatch_weight=microbatch_weight(scfg))
    reference = common.frozen_state(model) if scfg.kl_coef > 0 else None
    if reference is not None:
        reference = jax.tree.map(jnp.copy, reference)
    temperature = scfg.temperature if scfg.temperature > 0 else 1.0
    score = jax.jit(scoring.in_slices(lambda state, batch: scoring.completion_logprobs(
        nnx.merge(trainer.graphdef, state), batch, temperature, return_entropy=True), common.scoring_slices(scfg)))
    data = ctx.prompts(name, scfg.prompts_per_step)
    estimator = adv_lib.advantage_estimator(scfg.advantage)

    def step(state, i):
        rng = ctx.stage_rng(name, i)
        roll, row_weight = collect(ctx, common.current_model(trainer, state), data, scfg, rng)
        batch = runtime.place_batch(ctx, {k: roll[k] for k in common.ARRAY_KEYS})
        # Old logprobs from the trainer's own forward pass, so rho = 1 exactly at the first update.
        old_logp, entropy = score(state.params, batch)
        rewards = roll["rewards_shaped"]
        metrics = common.response_metrics(roll)
        metrics["entropy"] = float(losses.masked_mean(entropy, batch["mask"]))
        if reference is not None:
            ref_logp = score(reference, batch)[0]
            batch["ref_logp"] = ref_logp
            seq_kl = np.asarray(jnp.sum(losses.kl_estimate(old_logp, ref_logp, scfg.kl_kind) * batch["mask"], 1))
            metrics["kl_ref_seq"] = float(seq_kl.mean())
            if scfg.kl_mode == "reward":
                rewards = rewards - scfg.kl_coef * seq_kl
        adv = np.asarray(estimator(jnp.asarray(rewards), scfg.group_size)) * row_weight
        if scfg.tis_cap > 0:
            tis = jnp.minimum(jnp.exp(old_logp - jnp.asarray(roll["sample_logp"])), scfg.tis_cap)
        else:
            tis = jnp.ones_like(old_logp)
        batch.update(runtime.place_batch(ctx, {"advantages": adv.astype(np.float32), "row_weight": row_weight}))
        batch.update(old_logp=old_logp, tis_weight=tis)
        state, update_metrics = common.run_updates(
            trainer, state, batch, None, epochs=scfg.epochs, num_minibatches=scfg.minibatches,
            seed=(int(ctx.cfg.seed), i), tokens=float(roll["lengths"].sum()))
        metrics.update(update_metrics)
        gap = losses.masked_mean(jnp.abs(old_logp - roll["sample_logp"]), batch["mask"])
        metrics.update(advantage_mean=float(adv.mean()), advantage_std=float(adv.std()),
                       kept_group_frac=float(row_weight.mean()), sampler_trainer_logp_gap=float(gap))
        return state, metrics

    return runtime.StageProgram(trainer.graphdef, trainer.state, step, data, slot=scfg.model)
