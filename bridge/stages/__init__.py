"""Training stages: each stage kind declares its programs once, as a `StageKind`.

The runtime (`bridge.runtime`), the ahead-of-time compile (`bridge.abstract`) and
`launch.fit` read everything they need from the declaration, so a new kind is one module
with a `KIND` plus one line in `KINDS`, or no package edit at all: a config may name any
importable declaration as `kind="package.module:NAME"`.

    KIND = StageKind(
        loop=...,               # (ctx, unit, scfg, kind) -> runtime.StageProgram
        make_loss=...,          # (scfg, frozen_graphdefs) -> loss_fn(model, batch, frozen)
        batch_spec=...,         # (scfg, rows, prompt_len, completion) -> {key: (shape, dtype)}
        microbatch_weight=...,  # scfg -> (batch -> weight of a micro-batch)
        models=...,             # scfg -> {role: model reference}; "policy" is the trained one
        frozen_roles=...,       # scfg -> roles whose states the update step takes as `frozen`
                                #   (a tuple of states in this order; None when there are none)
        update_rows=...,        # scfg -> rows in one optimizer update
        sampling=...,           # scfg -> Sampling (who samples, how many) or None
        scored_roles=...,       # scfg -> roles scored teacher-forced on each rollout batch
        trained=...,            # optional: (scfg, policy, load) -> the module the TrainState
                                #   holds (default: the policy; a policy with a critic for PPO);
                                #   load(ref) gives any other model the module is built from
        policy_of=...,          # optional: trained module -> the policy the stage exports
        rollouts=...,           # optional: (cfg, scfg, steps) -> completions sampled in `steps`
                                #   steps (default: steps x prompts_per_step x n when it samples)
    )

A variant of an existing kind is `dataclasses.replace(rl.KIND, make_loss=...)`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The rollouts of a stage: model role, prompts per sampling call, samples per prompt, and
    the `sampling` sub-config (temperature, top_p, top_k, min_p, max_new_tokens, stop ids)."""

    role: str
    prompts: int
    n: int
    config: object


@dataclasses.dataclass(frozen=True)
class StageKind:
    """One stage kind's declaration (see the module docstring for each field's signature)."""

    loop: Callable
    make_loss: Callable
    batch_spec: Callable
    microbatch_weight: Callable
    models: Callable
    frozen_roles: Callable
    update_rows: Callable
    sampling: Callable
    scored_roles: Callable
    trained: Callable = lambda scfg, policy, load: policy
    policy_of: Callable = lambda module: module
    rollouts: Callable = None

    def __post_init__(self):
        if self.rollouts is None:
            object.__setattr__(self, "rollouts", self._rollouts_per_step)

    def _rollouts_per_step(self, cfg, scfg, steps: int) -> int:
        """A stage that samples `prompts_per_step` prompts x n every step (DAPO's and GHPO's
        extra samples not counted)."""
        plan = self.sampling(scfg)
        return 0 if plan is None else int(steps) * int(scfg.prompts_per_step) * int(plan.n)

    def build(self, ctx, unit, scfg):
        """The stage's program (`runtime.StageProgram`) for one unit of the pipeline."""
        return self.loop(ctx, unit, scfg, self)


def _registry() -> dict:
    from bridge.stages import erpd, opd, rl, self_distill, sft

    return {"rl": rl.KIND, "sft": sft.KIND, "opd": opd.KIND, "erpd_teacher": erpd.TEACHER,
            "erpd_distill": erpd.DISTILL,
            "self_distill": self_distill.KIND}


def kind(name: str) -> StageKind:
    """The declaration named `name`: a registered kind, or "package.module:NAME"."""
    kinds = _registry()
    if name in kinds:
        return kinds[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Stage kind {name!r} cannot be imported: {error}") from error
        if not isinstance(found, StageKind):
            raise ValueError(f"Stage kind {name!r} is a {type(found).__name__}, not a StageKind.")
        return found
    raise ValueError(f"Unknown stage kind {name!r}; choose one of {sorted(kinds)} or name one as "
                     "'package.module:NAME'.")
