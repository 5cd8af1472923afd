"""Building blocks for experiment configs: the run skeleton and one default per stage kind.

Every experiment's `get_config(arg)` starts from `base()`, adds models, a task and stages
made by `rl_stage` / `sft_stage` / `opd_stage` with its overrides, and returns the config
locked, so a misspelled override fails with the key's name.
"""

import ml_collections

from bridge.sharding import DEFAULT_RULES


def cd(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


def optimizer(lr: float, **kw) -> ml_collections.ConfigDict:
    """AdamW + global-norm clipping; see bridge.train_state.make_optimizer."""
    return cd(**{"lr": lr, "b1": 0.9, "b2": 0.99, "weight_decay": 0.0, "grad_clip": 1.0,
                 "warmup_steps": 0, "schedule": "constant", **kw})


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.remat = False  # recompute each decoder block in the backward pass (long sequences)
    c.scan_layers = False  # stack the blocks and lax.scan them: compile time independent of depth
    c.mesh = cd(shape=(1, -1, 1), rules=tuple((k, v) for k, v in DEFAULT_RULES))
    c.tokenizer = ""
    c.models = ml_collections.ConfigDict()
    c.task = cd(name="arithmetic", options=ml_collections.ConfigDict())
    # stages: stage names in order, or "block:<name>" for pipeline.blocks[<name>] (its stages
    # run `repeat` times in order; see bridge.runtime.run_pipeline)
    c.pipeline = cd(name="stages", stages=(), blocks=ml_collections.ConfigDict())
    c.stages = ml_collections.ConfigDict()
    # kl_reference: a model reference (e.g. "stage:student_sft", the base) to report the KL to
    # every: each stage's held-out learning curve, greedy accuracy on `curve_prompts` test
    # problems every `every` steps (0 = off), also on each task variant of `curve_tasks`
    # (name -> option overrides); see runtime.held_out_curve
    c.eval = cd(num_prompts=256, batch_size=256, max_new_tokens=16, n=1, temperature=0.0, top_p=1.0, top_k=0,
                kl_reference="", every=0, curve_prompts=256, curve_tasks=ml_collections.ConfigDict())
    c.checkpoint = cd(every=100, keep=2, max_nonfinite=3)
    c.metrics = cd(tensorboard=True, wandb_project="", progress=True, plots=True)
    # memory_fraction: the share of each GPU's memory JAX preallocates, set by the launchers
    # (bridge.distributed.set_memory_fraction); 0 = JAX's default, the environment variable wins.
    # frozen_on_host: keep frozen models (teachers, KL reference, ...) in pinned host memory between
    # uses, copied to device memory for each step that reads them (bridge.offload)
    c.system = cd(memory_fraction=0.0, frozen_on_host=False)
    return c


def sampling(n: int = 8, **kw) -> ml_collections.ConfigDict:
    """Every sampling stage's rollout settings: n samples per prompt, temperature (0 = greedy),
    top_p, top_k, min_p, max_new_tokens and extra stop token ids (besides the tokenizer's eos).
    proxy: proxy-tuning (Liu et al. 2024), the sampled model's logits plus alpha * (expert -
    antiexpert) at every decode step; expert and antiexpert are model references ("" = off).
    refill: slot refill (continuous batching, bridge/sampling/refill.py) with that many decode
    slots (rows); every prompt of the step in one call, a finished row's slot taking the next
    row; same rollouts as the static sampler at equal seed. 0 = the static sampler, in
    sample_batch_size chunks (benchmarks/rollout_lengths.py)."""
    return cd(**{"n": n, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_new_tokens": 16,
                 "stop_ids": (), "proxy": cd(expert="", antiexpert="", alpha=1.0), "refill": 0, **kw})


def block(stages: tuple, repeat: int) -> ml_collections.ConfigDict:
    """A repeated block of a pipeline: `stages` run in order, `repeat` times."""
    return cd(stages=tuple(stages), repeat=repeat)


def critic(**kw) -> ml_collections.ConfigDict:
    """PPO's value model and GAE (used by rl with advantage="gae" and erpd_teacher with
    teacher_loss="ppo"); each key is described in bridge/stages/critic.py."""
    return cd(**{"trunk": "shared", "init": "", "value_coef": 0.5, "value_clip": 0.2, "gamma": 1.0, "lam": 0.95,
                 "lam_end": -1.0, "length_alpha": 0.0, "value_lam": 1.0, "whiten": True, **kw})


def rl_stage(model: str, lr: float, steps: int, **kw) -> ml_collections.ConfigDict:
    """GRPO defaults (token-mean, clip 0.2, group 8, T=1); override for DAPO/Dr.GRPO/GSPO/...

    Batching: prompts_per_step * sampling.n rollout rows per step, sampled sample_batch_size
    prompts at a time (0: all); minibatches optimizer updates per step, each accumulated over
    microbatches slices of its rows (the scoring passes use slices of the same size).
    guidance (GHPO): enabled=True re-samples each group with no correct rollout after the first
    fractions[0] of its reference solution, then the next fraction while it still has none.
    off_policy_lag=1 samples step t+1's rollouts with the weights of step t while step t trains
    (0: on policy); rollout_devices=k samples on the first k devices and trains on the rest
    (0: one shared mesh); see bridge/stages/off_policy.py.
    """
    s = cd(kind="rl", model=model, init="", steps=steps, prompts_per_step=32, sampling=sampling(),
           loss="grpo", loss_kwargs=cd(clip_low=0.2, clip_high=0.2), aggregation="token-mean", max_len=0,
           advantage="grpo", kl_coef=0.0, kl_kind="k3", kl_mode="loss", reference="", entropy_coef=0.0,
           sample_batch_size=0, minibatches=1, microbatches=1, epochs=1, dynamic_sampling=False, max_refills=3,
           overlong_buffer=0, overlong_penalty=1.0, tis_cap=0.0, critic=critic(),
           guidance=cd(enabled=False, fractions=(0.25, 0.5, 0.75)), off_policy_lag=0, rollout_devices=0,
           optimizer=optimizer(lr))
    s.update(kw)
    return s


def sft_stage(model: str, lr: float, steps: int, **kw) -> ml_collections.ConfigDict:
    """Forward-KL warmup on teacher samples by default (`sampling.n` per prompt); source="gold",
    loss="cross_entropy" for SFT."""
    s = cd(kind="sft", model=model, init="", steps=steps, source="teacher", teacher="teacher",
           loss="forward_kl", teacher_temperature=1.0, task_options=ml_collections.ConfigDict(), pool_file="",
           pool_prompts=0, sampling=sampling(), sample_batch_size=64, batch_size=256, microbatches=1,
           until_accuracy=0.0, check_every=10, check_prompts=256, optimizer=optimizer(lr))
    s.update(kw)
    return s


def opd_stage(model: str, lr: float, steps: int, **kw) -> ml_collections.ConfigDict:
    """On-policy distillation with sampled-token reverse KL advantages by default. Several
    teachers: `teachers` (model references, replacing `teacher`) with pool `weights`."""
    s = cd(kind="opd", model=model, init="", steps=steps, teacher="teacher", teachers=(), weights=(),
           teacher_pool="geometric", teacher_temperature=1.0, base="", prompts_per_step=32, sampling=sampling(),
           loss="sampled_reverse_kl", coef=1.0, lam=1.25, beta=0.5, divergence_top_k=0, advantage_norm="none", clip_low=0.2,
           clip_high=0.2, tis_cap=0.0, tip_rule="", tip_keep_fraction=0.5, tip_entropy_quantile=0.5,
           tip_divergence_quantile=0.5, sample_batch_size=0,
           minibatches=1, microbatches=1, epochs=1, optimizer=optimizer(lr))
    s.update(kw)
    return s


def erpd_teacher_stage(model: str, lr: float, steps: int, **kw) -> ml_collections.ConfigDict:
    """ERPD stage 1: a copy of `init` trained `steps` updates on one fixed batch it samples
    (prompts_per_step x sampling.n, T = 0.6 as the paper), each update on 1/minibatches of it;
    exported and evaluated (the paper's tables report the teacher); see bridge/stages/erpd.py."""
    s = cd(kind="erpd_teacher", model=model, init="student", steps=steps, prompts_per_step=32,
           sampling=sampling(16, temperature=0.6), sample_batch_size=0, minibatches=8, microbatches=1,
           teacher_loss="ce", aggregation="mean", beta=0.05, clip_low=0.2, clip_high=0.28, tau_pos=1.0,
           tau_neg=1.05, kl_coef=0.0, track_every=5, snapshot_steps=(), export=True, critic=critic(),
           optimizer=optimizer(lr))
    s.update(kw)
    return s


def erpd_distill_stage(model: str, lr: float, steps: int, **kw) -> ml_collections.ConfigDict:
    """ERPD stage 2: trust-region distillation of `model` on the teacher stage's fixed batch
    with whitened per-token rewards of `strategies` (s1, s2, s3; several: an ensemble)."""
    s = cd(kind="erpd_distill", model=model, init="", steps=steps, batch="artifact:erpd_teacher/batch",
           strategies=("s1",), weights=(), teacher="erpd_teacher", unlearned="", weak="", denominator="old",
           sampling=sampling(16, temperature=0.6), minibatches=8, microbatches=1, prompts_per_step=32, clip_low=0.2, clip_high=0.28, kl_coef=0.0, entropy_coef=0.0, track_every=5,
           optimizer=optimizer(lr))
    s.update(kw)
    return s


def parse_arg(arg: str | None, known: tuple[str, ...]) -> list[str]:
    """"toy,no_warmup" -> ["toy", "no_warmup"], naming any unknown part."""
    parts = [p for p in (arg or "").split(",") if p]
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise ValueError(f"Unknown config variant(s) {unknown}; known: {', '.join(known)}.")
    return parts


def self_distill_stage(model: str, lr: float, steps: int, **kw) -> ml_collections.ConfigDict:
    """Self-distillation with privileged context (bridge/stages/self_distill.py): the policy's
    own samples, its teacher the same model after the prompt plus `context` (opsd, sdpo, hint,
    critique); `teacher` frozen | live | ema; generalized JSD (beta 0.5) by default;
    route="srpo" sends correct samples to GRPO instead."""
    s = cd(kind="self_distill", model=model, init="", steps=steps, context="opsd", context_tokens=16,
           teacher="frozen", ema_decay=0.99, teacher_temperature=1.0, loss="jsd", beta=0.5, divergence_top_k=0,
           coef=1.0, advantage_norm="none", route="", advantage="grpo", entropy_tau=1.0, clip_low=0.2,
           clip_high=0.2, prompts_per_step=32, sampling=sampling(), sample_batch_size=0, minibatches=1,
           microbatches=1, epochs=1, optimizer=optimizer(lr))
    s.update(kw)
    return s
