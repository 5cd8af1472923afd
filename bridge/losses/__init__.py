"""Objectives as small pure functions: policy surrogates, KL estimators, implicit reward
models, teacher-student divergences and the aggregation that reduces them.

Configs pick policy surrogates by name through `policy_loss(name, **kwargs)`, which returns
the function with the keyword arguments bound; the critic's loss is `clipped_value_loss`; divergences are picked by the stages' kernels
(`bridge.scoring.completion_divergence`).
"""
import functools

from bridge.losses.aggregation import AGGREGATIONS, aggregate, counted_rows, masked_mean
from bridge.losses.divergences import (
    entropy,
    forward_cross_entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    topk_forward_kl,
    topk_generalized_jsd,
    topk_reverse_kl,
    topk_tail_log_probs,
)
from bridge.losses.kl import KL_ESTIMATORS, LOSS_KL_ESTIMATORS, kl_estimate
from bridge.losses.policy import clipped_surrogate, cispo_loss, gspo_loss, sapo_loss
from bridge.losses.reward_models import implicit_prm_ce_loss, implicit_token_rewards, mse_reward_loss
from bridge.losses.value import clipped_value_loss

POLICY_LOSSES = {
    "grpo": clipped_surrogate,
    "ppo": clipped_surrogate,
    "gspo": gspo_loss,
    "sapo": sapo_loss,
    "cispo": cispo_loss,
}

def _lookup(registry, kind, name, kwargs):
    if name not in registry:
        raise ValueError(f"Unknown {kind} {name!r}; choose one of {sorted(registry)}.")
    return functools.partial(registry[name], **kwargs)


def policy_loss(name, **kwargs):
    """The policy surrogate named `name` (grpo/ppo, gspo, sapo, cispo) with kwargs bound."""
    return _lookup(POLICY_LOSSES, "policy loss", name, kwargs)


__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LOSS_KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "cispo_loss",
    "clipped_surrogate",
    "clipped_value_loss",
    "counted_rows",
    "entropy",
    "forward_cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "gspo_loss",
    "implicit_prm_ce_loss",
    "implicit_token_rewards",
    "kl_estimate",
    "masked_mean",
    "mse_reward_loss",
    "policy_loss",
    "reverse_kl",
    "sapo_loss",
    "topk_forward_kl",
    "topk_generalized_jsd",
    "topk_reverse_kl",
    "topk_tail_log_probs",
]
