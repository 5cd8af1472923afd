"""RL with verifiable rewards: GRPO and its family, chosen by config.

One step: sample `sampling.n` completions for each of `prompts_per_step` prompts, reward
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
| advantage=gae, loss=ppo        | PPO with a critic (Schulman et al.     |
|   (critic sub-config)          |   2017), GAE; VAPO's lambda options    |

KL to a reference model is a loss term (kl_mode="loss", estimator k2 or k3: see
`bridge.losses.kl` for which KL each one's gradient follows) or a per-sequence reward
penalty subtracted before group normalization (kl_mode="reward", k1/k2/k3); kl_coef=0 keeps
no reference copy. The reference is a model reference (`reference`: a slot, "stage:<name>"
or "hf:<path>", e.g. the original base model); "" is the stage's initial policy.
tis_cap > 0 multiplies each token's advantage by min(pi_old/pi_sample, cap), the truncated
importance correction for sampler/trainer mismatch (Yao et al. 2025); pi_sample is the
sampler's log-probability before top-k/top-p truncation, so the ratio is the mismatch alone.
off_policy_lag=1 trains step t on rollouts sampled with step t-1's weights (sampled while
update t-1 ran), and rollout_devices=k samples on the first k devices and trains on the rest
(`bridge.stages.off_policy`: the schedule, and the lag's correction: old logprobs recomputed
by the trainer, tis_cap's weight); both default to 0, strictly on policy on one mesh.

DAPO's dynamic sampling keeps a group when 0 < #correct < G on the verifier's accuracy
(as verl filters); the overlong penalty shapes the rewards of the kept groups only.
Sequence-mean aggregations average over the rows that count (row weight > 0).

GHPO's adaptive guidance (Liu et al. 2025, "GHPO: Adaptive Guidance for Stable and Efficient
LLM Reinforcement Learning"), guidance.enabled: a group with no correct rollout is sampled
again with the first guidance.fractions[0] of its reference solution (`Task.guidance`) after
the prompt, then with the next fraction while it still has none (0.25 -> 0.5 -> 0.75); the
last guided group replaces the unguided one, and groups with a correct rollout (and groups
whose example has no solution) keep plain RL. The prefix is the start of the response: the
policy continues it, the verifier scores prefix + continuation, and the policy is trained
conditioned on the guided prompt, as GHPO does: the batch's prompt is prompt + prefix, so
the old, sampler, reference logprobs and the critic's values are all of the continuation
given the guided prompt, and the loss mask covers the generated continuation only. Guidance
runs before DAPO's filter (a guided group with 0 < #correct < G is informative). Metrics per
step: guidance_fired_frac (groups with no correct unguided rollout), guidance_fraction_mean
(the prefix fraction each fired group ended at), guidance_solved_frac and guidance_accuracy
(of the fired groups' final samples), guidance_f<percent>_groups / _accuracy (per fraction
tried), and accuracy_unguided (the plain samples' accuracy; `accuracy` is of the batch
trained on, guided rows included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bridge import advantages as adv_lib, distributed, losses, offload, runtime, sampling, scoring, sharding
from bridge.models import value
from bridge.stages import StageKind, common, critic, off_policy
from bridge.tasks import soft_overlong_penalty


def microbatch_weight(scfg):
    """Weight of a micro-batch in the accumulated gradient: tokens for token-mean, else the
    rows that count (both 0 for a batch whose every group was dropped: a no-op update)."""
    return common.token_count("row_weight") if scfg.aggregation == "token-mean" else common.row_count("row_weight")


def uses_critic(scfg) -> bool:
    """advantage="gae": per-token GAE advantages from a value model trained alongside (PPO)."""
    return scfg.advantage == "gae"


def make_loss_fn(scfg):
    """(model, batch, frozen) -> (loss, metrics): surrogate + KL term - entropy bonus (+ the
    critic's value loss with advantage="gae")."""
    policy = losses.policy_loss(scfg.loss, **scfg.loss_kwargs.to_dict())
    mode, max_len = scfg.aggregation, scfg.get("max_len") or None
    temperature = sampling.processors.scoring_temperature(scfg.sampling.temperature)

    def loss_fn(model, batch, frozen):
        # The entropy (and its gradient) is computed here only when it is a loss term; the
        # reported entropy comes from the old-logprob pass, outside the differentiated step.
        logp, ent, values = critic.train_scores(model, batch, temperature, entropy=bool(scfg.entropy_coef),
                                                critic=uses_critic(scfg))
        mask = batch["mask"] * batch["row_weight"][:, None]
        adv = batch["advantages"]
        adv = (adv if adv.ndim == 2 else adv[:, None]) * batch["tis_weight"]
        loss, metrics = policy(logp, batch["old_logp"], adv, mask, aggregation=mode, max_len=max_len)
        if values is not None:
            value_loss, value_metrics = critic.value_term(scfg.critic, values, batch, mask)
            loss = loss + value_loss
            metrics.update(value_metrics)
        if scfg.kl_coef > 0 and scfg.kl_mode == "loss":
            kl = losses.aggregate(losses.kl_estimate(logp, batch["ref_logp"], scfg.kl_kind), mask, mode, max_len)
            loss = loss + scfg.kl_coef * kl
            metrics["kl_ref"] = kl
        if scfg.entropy_coef:
            loss = loss - scfg.entropy_coef * losses.aggregate(ent, mask, mode, max_len)
            metrics["entropy_bonus"] = losses.masked_mean(ent, mask)
        return loss, metrics

    return loss_fn


def shaped_rewards(rollout: common.Rollout, scfg) -> np.ndarray:
    """Verifier rewards plus DAPO's soft overlong penalty when overlong_buffer > 0."""
    rewards = rollout.rewards.copy()
    if scfg.overlong_buffer > 0:
        rewards += scfg.overlong_penalty * np.array(
            [soft_overlong_penalty(int(n), scfg.sampling.max_new_tokens, scfg.overlong_buffer)
             for n in rollout.lengths], np.float32)
    return rewards


def informative_groups(correct: np.ndarray, group_size: int) -> np.ndarray:
    """bool[G]: groups with 0 < #correct < G (DAPO's dynamic-sampling filter, on accuracy)."""
    hits = np.asarray(correct, bool).reshape(-1, group_size).sum(axis=1)
    return (hits > 0) & (hits < group_size)


class GuidanceStats:
    """Counts of one step's GHPO guidance, summed over its prompt draws (`metrics`)."""

    def __init__(self, fractions):
        self.fractions = tuple(float(f) for f in fractions)
        self.groups = self.fired = self.solved = self.unguidable = 0
        self.plain_correct = self.plain_rows = self.final_correct = self.final_rows = 0
        self.fraction_sum = 0.0
        self.at = {f: [0, 0, 0] for f in self.fractions}  # fraction -> [groups, correct rows, rows]

    def metrics(self) -> dict:
        out = {"guidance_fired_frac": self.fired / max(self.groups, 1),
               "guidance_fraction_mean": self.fraction_sum / max(self.fired - self.unguidable, 1),
               "guidance_solved_frac": self.solved / max(self.fired - self.unguidable, 1),
               "guidance_accuracy": self.final_correct / max(self.final_rows, 1),
               "guidance_unguidable_frac": self.unguidable / max(self.groups, 1),
               "accuracy_unguided": self.plain_correct / max(self.plain_rows, 1)}
        for f, (groups, correct, rows) in self.at.items():
            name = f"guidance_f{round(100 * f)}"
            out[f"{name}_groups"] = float(groups)
            out[f"{name}_accuracy"] = correct / max(rows, 1)
        return out


def guide(ctx, model, roll: common.Rollout, scfg, seeds, stats: GuidanceStats) -> common.Rollout:
    """GHPO on one sampled batch (see the module docstring): each group of `roll` with no
    correct rollout is sampled again after a growing prefix of its reference solution until
    one is correct or the fractions run out; returns the rollout with those groups replaced
    (same group order). `seeds(level)` is the sampling seed of the level-th fraction."""
    n = int(scfg.sampling.n)
    hits = roll.correct.reshape(-1, n).sum(axis=1)
    groups = [roll.rows(slice(g * n, (g + 1) * n)) for g in range(len(hits))]
    fired = [g for g in range(len(hits)) if hits[g] == 0]
    pending = [g for g in fired if groups[g].examples[0].solution]
    guided, ended_at = list(pending), {}
    for level, fraction in enumerate(stats.fractions):
        if not pending:
            break
        examples = [groups[g].examples[0] for g in pending]
        # Padded to a power of two (copies of the last prompt, dropped after sampling), so a run
        # compiles the sampler for a few batch sizes, not for every count of unsolved groups.
        width = min(1 << (len(examples) - 1).bit_length(), len(hits))
        padded = examples + [examples[-1]] * (width - len(examples))
        again = common.sample_rollout(ctx, model, padded, scfg.sampling, seed=seeds(level),
                                      chunk_prompts=scfg.sample_batch_size,
                                      prefixes=[ctx.task.guidance(e, fraction) for e in padded])
        counts = stats.at[fraction]
        for k, g in enumerate(pending):
            groups[g] = again.rows(slice(k * n, (k + 1) * n))
            ended_at[g] = fraction
            counts[0] += 1
            counts[1] += int(groups[g].correct.sum())
            counts[2] += n
        pending = [g for g in pending if not groups[g].correct.any()]
    stats.groups += len(hits)
    stats.fired += len(fired)
    stats.unguidable += len(fired) - len(guided)
    stats.plain_correct += int(roll.correct.sum())
    stats.plain_rows += len(roll.correct)
    stats.fraction_sum += sum(ended_at.values())
    stats.solved += sum(int(groups[g].correct.any()) for g in guided)
    stats.final_correct += sum(int(groups[g].correct.sum()) for g in guided)
    stats.final_rows += n * len(guided)
    return common.Rollout.concat(groups) if groups else roll


def collect(ctx, model, data, scfg, seeds, stats: GuidanceStats | None = None) -> tuple[common.Rollout, np.ndarray]:
    """Rollouts for one step and a row weight [R] (0 on groups DAPO's filter drops).

    Without dynamic sampling: one batch of prompts. With it: keeps drawing prompt batches
    (up to max_refills more) until prompts_per_step informative groups are found; if they
    are not, uninformative groups fill the batch with weight 0, so shapes stay fixed.
    `seeds(attempt)` is the sampling seed of each draw. With `stats` (guidance enabled), each
    draw's unsolved groups are guided first (`guide`), their seeds `seeds("<attempt>/guide<level>")`.
    """
    n = scfg.sampling.n
    kept, spare = [], []
    for attempt in range(1 + (scfg.max_refills if scfg.dynamic_sampling else 0)):
        examples = next(data).examples
        roll = common.sample_rollout(ctx, model, examples, scfg.sampling, seed=seeds(attempt),
                                     chunk_prompts=scfg.sample_batch_size)
        if stats is not None:
            roll = guide(ctx, model, roll, scfg, lambda level, a=attempt: seeds(f"{a}/guide{level}"), stats)
        if not scfg.dynamic_sampling:
            return roll, np.ones(len(roll.rewards), np.float32)
        good = informative_groups(roll.correct, n)
        for g, ok in enumerate(good):
            (kept if ok else spare).append(roll.rows(slice(g * n, (g + 1) * n)))
        if len(kept) >= scfg.prompts_per_step:
            break
    groups = (kept + spare)[: scfg.prompts_per_step]
    weight = np.repeat([1.0 if i < len(kept) else 0.0 for i in range(len(groups))], n).astype(np.float32)
    return common.Rollout.concat(groups), weight


def check_guidance(name: str, scfg, task) -> None:
    """guidance.fractions: increasing, each in (0, 1]; the task's training examples need
    reference solutions (`Example.solution`) to guide with."""
    fractions = [float(f) for f in scfg.guidance.fractions]
    if not fractions or any(not 0 < f <= 1 for f in fractions) or fractions != sorted(set(fractions)):
        raise ValueError(f"Stage {name!r}: guidance.fractions must be increasing fractions in (0, 1]; "
                         f"got {tuple(fractions)}.")
    if not any(e.solution for e in task.examples("train")):
        raise ValueError(f"Stage {name!r}: guidance needs reference solutions, and no training example of task "
                         f"{task.name!r} has one (Example.solution).")


def check_kl(name: str, scfg) -> None:
    """kl_mode is "loss" (k2 or k3) or "reward" (any estimator); k1 as a loss is refused."""
    if scfg.kl_mode not in ("loss", "reward"):
        raise ValueError(f"Stage {name!r}: kl_mode must be 'loss' or 'reward', not {scfg.kl_mode!r}.")
    if scfg.kl_coef > 0 and scfg.kl_mode == "loss" and scfg.kl_kind not in losses.LOSS_KL_ESTIMATORS:
        raise ValueError(f"Stage {name!r}: kl_kind={scfg.kl_kind!r} as a loss has zero expected gradient; "
                         f"use k1 with kl_mode='reward', or k2 (gradient of KL(pi || ref)) or k3 "
                         f"(gradient of KL(ref || pi), as GRPO) with kl_mode='loss'.")


def models(scfg) -> dict:
    """The policy (trained) and, with a KL term, the reference ("" = the initial policy)."""
    out = {"policy": scfg.get("init") or scfg.model}
    if scfg.kl_coef > 0:
        out["reference"] = scfg.get("reference") or out["policy"]
    return out


def batch_spec(scfg, rows: int, prompt_len: int, completion: int) -> dict:
    extra = dict(old_logp="token", advantages="row", row_weight="row", tis_weight="token")
    if uses_critic(scfg):
        extra.update(advantages="token", old_values="token", returns="token")
    if scfg.kl_coef > 0 and scfg.kl_mode == "loss":
        extra["ref_logp"] = "token"
    return common.rollout_batch_spec(rows, prompt_len, completion, **extra)


def loop(ctx: runtime.Context, unit, scfg, kind) -> runtime.StageProgram:
    check_kl(unit.id, scfg)
    guided = bool(scfg.get("guidance") and scfg.guidance.enabled)
    if guided:
        check_guidance(unit.id, scfg, ctx.task)
    if uses_critic(scfg):
        critic.check(unit.id, scfg.critic)
    lag = int(scfg.get("off_policy_lag", 0))
    tctx, rctx = off_policy.contexts(ctx, scfg, unit.id)  # training / rollout (one shared mesh: ctx, ctx)
    split = tctx is not ctx
    model = ctx.model(scfg.get("init") or scfg.model)
    updates = scfg.steps * scfg.epochs * scfg.minibatches
    temperature = sampling.processors.scoring_temperature(scfg.sampling.temperature)
    slices = common.scoring_slices(scfg)
    reference = None
    if scfg.kl_coef > 0:  # copied before the trainer takes (and donates) the policy's buffers
        reference_model = ctx.model(models(scfg)["reference"])
        common.check_vocab(reference_model, model, unit.id)
        reference_graphdef, reference = nnx.split(reference_model)
        reference = offload.frozen_copy(ctx, reference)  # system.frozen_on_host: in host memory
        if split:
            reference = offload.park(ctx, sharding.shard_state(reference, tctx.mesh, tctx.rules))
        score_reference = jax.jit(scoring.in_slices(lambda state, batch: scoring.completion_logprobs(
            nnx.merge(reference_graphdef, state), batch, temperature), slices))
    trainer = common.make_trainer(tctx, kind, scfg, model, (), updates)
    score = jax.jit(scoring.in_slices(lambda state, batch: scoring.completion_logprobs(
        kind.policy_of(nnx.merge(trainer.graphdef, state)), batch, temperature, return_entropy=True), slices))
    score_values = critic.value_scorer(trainer.graphdef, slices) if uses_critic(scfg) else None
    data = ctx.prompts(unit, scfg.prompts_per_step)
    if lag:
        data = off_policy.Lookahead(data)
    estimator = None if uses_critic(scfg) else adv_lib.advantage_estimator(scfg.advantage)

    def sampler_model(state):
        """The policy rollouts sample with: the trainer's, or (lagged or on its own mesh) a copy."""
        policy = common.current_model(trainer, state)
        return off_policy.policy_copy(policy, rctx) if lag or split else policy

    def rollout(policy, i):
        stats = GuidanceStats(scfg.guidance.fractions) if guided else None
        with sharding.use_mesh(rctx.mesh, rctx.rules):
            roll, row_weight = collect(rctx, policy, data, scfg,
                                       lambda attempt: ctx.seed(unit, i, f"sample/{attempt}"), stats)
        return roll, row_weight, stats

    def prepare(state, i, roll, row_weight, stats):
        """The update batch of a rollout (old logprobs from the trainer at `state`) and its metrics."""
        # With guidance, a guided row's prompt is prompt + prefix: every score below conditions on it.
        batch, sample_logp = common.place_rollout(tctx, roll)
        # Old logprobs from the trainer's own forward pass, so rho = 1 exactly at the first update.
        old_logp, entropy = score(state.params, batch)
        rewards = shaped_rewards(roll, scfg)
        metrics = common.response_metrics(roll)
        if stats is not None:
            metrics.update(stats.metrics())
        metrics["entropy"] = float(losses.masked_mean(entropy, batch["mask"]))
        if reference is not None:
            ref_logp = score_reference(offload.fetch(reference), batch)
            if scfg.kl_mode == "loss":
                batch["ref_logp"] = ref_logp
            seq_kl = distributed.to_host(jnp.sum(losses.kl_estimate(old_logp, ref_logp, scfg.kl_kind) * batch["mask"], 1))
            metrics["kl_ref_seq"] = float(seq_kl.mean())
            if scfg.kl_mode == "reward":
                rewards = rewards - scfg.kl_coef * seq_kl
        if score_values is None:
            adv = np.asarray(estimator(jnp.asarray(rewards), scfg.sampling.n)) * row_weight
        else:  # PPO: per-token GAE advantages from the critic's values of this rollout
            old_values = score_values(state.params, batch)
            adv, returns, critic_metrics = critic.advantages(
                scfg.critic, rewards, old_values, batch["mask"] * row_weight[:, None], roll.lengths,
                step=i, total=int(scfg.steps))
            adv = np.asarray(adv)
            batch.update(old_values=old_values, returns=returns)
            metrics.update(critic_metrics)
        batch.update(runtime.place_batch(tctx, {"advantages": adv.astype(np.float32), "row_weight": row_weight}))
        tis = common.tis_weight(old_logp, sample_logp, scfg.tis_cap)
        batch.update(old_logp=old_logp, tis_weight=tis)
        metrics.update(advantage_mean=float(adv.mean()), advantage_std=float(adv.std()),
                       kept_group_frac=float(row_weight.mean()),
                       **common.mismatch_metrics(old_logp, sample_logp, tis, batch["mask"]))
        return batch, metrics

    def step(state, i):
        roll = rollout(sampler_model(state), i)
        with sharding.use_mesh(tctx.mesh, tctx.rules):
            batch, metrics = prepare(state, i, *roll)
            state, update_metrics = common.run_updates(
                trainer, state, batch, None, epochs=scfg.epochs, num_minibatches=scfg.minibatches,
                rng=ctx.np_rng(unit, i, "minibatches"), tokens=float(roll[0].lengths.sum()))
        metrics.update(update_metrics)
        return state, metrics

    def lagged_step(state, i):  # off_policy_lag=1: see bridge/stages/off_policy.py
        behind = sampler_model(state)  # theta_i, copied before the updates donate the state
        roll = data.take(i)
        metrics = {"rollout_policy_lag": float(roll is not None)}
        roll = roll or rollout(behind, i)
        with sharding.use_mesh(tctx.mesh, tctx.rules):
            batch, prepared = prepare(state, i, *roll)
            state, finish = off_policy.dispatch_updates(
                trainer, state, batch, epochs=scfg.epochs, num_minibatches=scfg.minibatches,
                rng=ctx.np_rng(unit, i, "minibatches"), tokens=float(roll[0].lengths.sum()))
        if i + 1 < int(scfg.steps):
            data.ahead(i + 1, lambda: rollout(behind, i + 1))
        metrics.update(prepared)
        metrics.update(finish())
        return state, metrics

    return runtime.StageProgram(trainer.graphdef, trainer.state, lagged_step if lag else step, data)


KIND = StageKind(
    loop=loop,
    make_loss=lambda scfg, frozen_graphdefs: make_loss_fn(scfg),
    batch_spec=batch_spec,
    microbatch_weight=microbatch_weight,
    models=models,
    frozen_roles=lambda scfg: (),
    update_rows=common.rollout_update_rows,
    sampling=common.rollout_sampling,
    scored_roles=lambda scfg: tuple(models(scfg)),
    trained=critic.trained_module(uses_critic),
    policy_of=value.policy_of,
)
