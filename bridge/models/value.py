"""A policy with a value model: the critic of PPO with GAE.

    ActorCritic(policy, critic=None)   critic=None: a scalar head on the policy's own trunk
                                       (its final-norm hidden states); else a separate decoder
                                       trunk (its LM head unused) under the head
    V(s_t) = h_t . w + b                h_t the hidden state that predicts completion token t,
                                       i.e. the state (prompt, y_<t) before the token

The head starts at zero (V = 0 everywhere: GAE starts from plain discounted returns). The
stage trains the whole module with one optimizer; it exports `policy_of(module)`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bridge import scoring
from bridge.models.decoder import Decoder


class ActorCritic(nnx.Module):
    def __init__(self, policy: Decoder, critic: Decoder | None = None):
        self.policy = policy
        self.critic = critic
        trunk = critic if critic is not None else policy
        d, dtype = trunk.config.hidden_size, trunk.config.param_dtype
        self.value_head = nnx.Param(jnp.zeros((d,), dtype), axes=("embed",))
        self.value_bias = nnx.Param(jnp.zeros((), jnp.float32), axes=())

    @property
    def config(self):
        return self.policy.config

    def values_from_hidden(self, hidden):
        """float32[B, T] from trunk hidden states [B, T, D]."""
        return (jnp.dot(hidden.astype(jnp.float32), self.value_head[...].astype(jnp.float32))
                + self.value_bias[...])


def policy_of(module):
    """The policy a trained module holds (the module itself when it has no critic)."""
    return module.policy if isinstance(module, ActorCritic) else module


def logprobs_and_values(module: ActorCritic, batch, temperature: float = 1.0, return_entropy: bool = False):
    """(logp[, entropy], values) of the batch's completion tokens: one trunk pass for the
    policy and, with a shared trunk, the values read from the same hidden states."""
    hidden = scoring.completion_hidden(module.policy, batch)
    out = scoring.hidden_logprobs(hidden, batch["tokens"], module.policy.head(), temperature, return_entropy)
    critic_hidden = hidden if module.critic is None else scoring.completion_hidden(module.critic, batch)
    values = module.values_from_hidden(critic_hidden)
    return (*out, values) if return_entropy else (out, values)


def completion_values(module: ActorCritic, batch):
    """Values float32[B, T] of the batch's completion states (no policy pass with a separate critic)."""
    trunk = module.critic if module.critic is not None else module.policy
    return module.values_from_hidden(scoring.completion_hidden(trunk, batch))
