"""Tunix 0.1.7's GRPOLearner running whole GRPO steps on request: the Tunix side of rl_step_vs_tunix.py.

Run by the Tunix venv's python as the `common.TunixPeer` of benchmarks/rl_step_vs_tunix.py:

    /work/tunix-venv/bin/python benchmarks/rl_step_tunix.py --serve --model DIR --prompts DIR/prompts.json

- Models: actor and reference are each `common.tunix_qwen3(DIR)` (Tunix's Qwen3, float32, Tunix's
  safetensors loader; untied embeddings as DIR/config.json says), on a 1 x 1 ("fsdp", "tp") mesh
  shared by actor, rollout and reference (colocated; the rollout uses the actor's weights).
- `RLCluster(rollout_engine="vanilla")` with RolloutConfig(max_tokens_to_generate=64, temperature 0.9,
  top_p 1, max_prompt_length 16, kv_cache_size 80 = prompt + new tokens, eos 1), and
  `GRPOLearner(GRPOConfig(num_generations=4, num_iterations=1, beta=0.04, kl_loss_mode="low_var_kl"
  (k3), epsilon=0.2, loss_agg_mode="token-mean"))`, optimizer clip_by_global_norm(1.0) + adamw(1e-6,
  b1 0.9, b2 0.99, wd 0), max_steps 4, one update per step (mini batch = the whole 32 rows).
- Tokens: prompts are the ids as text ("12 345 ..."); `TokenIds` encodes such text back to the ids and
  decodes ids to it (bos none, eos 1, pad 0), so the reward function reads the completion's ids:
  the fraction of even ids.
- num_iterations = 1: Tunix computes no old-policy logprobs (its loss uses the current policy's,
  stop-gradient, as the ratio's denominator); bridge's stage scores old logprobs (and the entropy
  metric) in a separate pass. Both score the reference.

Protocol: prints {"ready": true, ...} once the learner is built, then runs `learner.train` on a data
iterator that waits for one line {"step": true} on stdin before handing over each batch (8 prompts);
when the learner asks for the next batch (or train() returns, after step 4) the step is over and its
times are printed as one JSON line: total (from handing over the batch until the learner asks for the
next or returns, metric logging included), rollout (`rl_cluster.generate`), scoring
(`rl_cluster.get_ref_per_token_logps`), rewards (`_compute_rewards` + advantages are inside Tunix's
`_generate_and_compute_advantage`; rewards alone are timed), update (`rl_cluster.update_actor`, the
actor's params ready), and other = total - the rest (Tunix's host work between phases).
The phases are timed by wrapping those methods on the instances, each result made ready
(`jax.block_until_ready`) before the clock stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import common

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

EOS_ID, PAD_ID = 1, 0
GROUP, NEW_TOKENS, TEMPERATURE, BETA, LR, STEPS = 4, 64, 0.9, 0.04, 1e-6, 4


class TokenIds:
    """Tunix's tokenizer interface over text that is space-separated token ids."""

    def encode(self, text, **kwargs) -> list[int]:
        if not isinstance(text, str):  # Tunix may hand over a numpy string (array) or ids
            text = " ".join(str(x) for x in np.ravel(np.asarray(text)))
        return [int(i) for i in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return EOS_ID

    def pad_id(self) -> int:
        return PAD_ID


def even_fraction(prompts, completions, **kwargs) -> list[float]:
    out = []
    for text in completions:
        ids = [int(i) for i in text.split()]
        out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--serve", action="store_true")
    args = parser.parse_args()
    reply = os.fdopen(os.dup(1), "w")  # our JSON lines; anything Tunix prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    with open(args.prompts) as f:
        prompts = json.load(f)
    prompt_len = len(prompts[0])
    config, actor = common.tunix_qwen3(args.model)
    _, reference = common.tunix_qwen3(args.model)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))  # Auto axes
    roles = rl_cluster_lib.Role
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.chain(optax.clip_by_global_norm(1.0),
                                    optax.adamw(LR, b1=0.9, b2=0.99, weight_decay=0.0)),
        eval_every_n_steps=10**9, max_steps=STEPS)
    rollout = base_rollout.RolloutConfig(max_tokens_to_generate=NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0,
                                         top_k=None, max_prompt_length=prompt_len,
                                         kv_cache_size=prompt_len + NEW_TOKENS, eos_tokens=[EOS_ID])
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=TokenIds(),
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout))
    algo = grpo_learner.GRPOConfig(num_generations=GROUP, num_iterations=1, beta=BETA, kl_loss_mode="low_var_kl",
                                   epsilon=0.2, loss_agg_mode="token-mean")
    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[even_fraction])

    times: dict[str, float] = {}
    info: dict = {}

    def wrap(obj, name, phase, ready=lambda out: out):
        original = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = original(*a, **kw)
            jax.block_until_ready(ready(out))
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0
            return out

        setattr(obj, name, timed)

    def rollout_ready(out):
        info["lengths"] = [len(t) for t in out.tokens]
        return out.tokens

    def rewards_ready(out):
        info["reward"] = float(np.mean(out))
        return out

    wrap(cluster, "generate", "rollout", rollout_ready)
    wrap(cluster, "get_ref_per_token_logps", "scoring")
    wrap(learner, "_compute_rewards", "rewards", rewards_ready)
    wrap(cluster, "update_actor", "update", lambda out: nnx.state(cluster.actor_trainer.model))

    def answer(start: float) -> None:
        total = time.perf_counter() - start
        phases = {k: times.get(k, 0.0) for k in ("rollout", "scoring", "rewards", "update")}
        row = dict(total=total, **phases, other=total - sum(phases.values()),
                   reward=info.get("reward"), length=float(np.mean(info.get("lengths", [np.nan]))))
        reply.write(json.dumps(row) + "\n")
        reply.flush()

    def batches():
        for _ in range(STEPS):
            line = sys.stdin.readline()
            if not line:
                return
            times.clear()
            info.clear()
            start = time.perf_counter()
            yield {"prompts": np.array([" ".join(str(i) for i in p) for p in prompts])}  # one leaf: Tunix tree-maps it
            answer(start)

    reply.write(json.dumps(dict(
        ready=True, versions=common.tunix_versions("optax"), version=common.tunix_versions().split(",")[0],
        what="GRPOLearner.train (RLCluster, vanilla rollout, colocated actor/reference on one CPU device), "
             "steps driven one at a time from the benchmark; phases timed by wrapping RLCluster.generate "
             "(rollout), RLCluster.get_ref_per_token_logps (scoring: reference only, Tunix computes no old "
             "logprobs at num_iterations=1), GRPOLearner._compute_rewards (rewards) and "
             "RLCluster.update_actor (update); 'other' is the rest of Tunix's step (host-side batching, "
             "advantages, metric logging).")) + "\n")
    reply.flush()
    gen = batches()
    learner.train(gen)
    # train() returned after max_steps: the last step's answer is still owed (the generator is suspended)
    with __import__("contextlib").suppress(StopIteration):
        next(gen)
    for _ in sys.stdin:  # the caller closes stdin when done
        pass


if __name__ == "__main__":
    main()
