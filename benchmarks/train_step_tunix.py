"""Tunix's GRPO train step on the weights and batch `benchmarks/train_step.py` writes.

Run by the Tunix venv's python (google-tunix 0.1.7 pins its own jax), as the `common.TunixPeer`
of train_step.py (--serve), which prints both sides in one table; alone it times --repeats steps:

    /work/tunix-venv/bin/python benchmarks/train_step_tunix.py --model DIR --batch DIR/batch.npz

What is timed, and how it matches bridge's step:
- Model: `common.tunix_qwen3`: Tunix's own Qwen3 (`tunix.models.qwen3`), config read from
  DIR/config.json, weights loaded by Tunix's safetensors loader, float32.
- Step: the actor trainer's jitted train step exactly as `GRPOLearner` wires it
  (`rl.trainer.Trainer` + `with_loss_fn(grpo_loss_fn, has_aux=True)` +
  `with_gen_model_input_fn({"train_example", "algo_config"})`, then
  `jit_train_and_eval_step(cache_nnx_graph=True)` as `train()` calls it): forward,
  grpo_loss_fn (clip 0.2/0.2, token-mean, beta 0 so no reference model), backward,
  `nnx.Optimizer.update` with AdamW (b1 0.9, b2 0.99, wd 0) after global-norm clip 1.0.
- Not timed, because it is not part of the update: `GRPOLearner`'s rollout (sampling),
  reward and advantage computation, reference/old-policy scoring passes and host-side
  metric logging. Building a full `GRPOLearner` needs an `RLCluster` with a rollout engine
  and tokenizer; the batch (a `TrainExample`) is given directly instead, with bridge's
  advantages and old logprobs, so both compute the same loss on the same numbers.
- Each step is timed until loss, aux and grad norm are ready (what Tunix's own
  `peft_train_step` span waits for), after compile + one warm-up step.
Prints one JSON object (first-step loss and grad norm, second-step loss, XLA FLOP count,
versions; alone also the median and min of --repeats steps). With --serve it is the ready line
of `common.serve`, and each request {"step": true} on stdin is answered with {"seconds": ...} of
one step, so the caller can alternate these steps with its own.
"""

from __future__ import annotations

import argparse
import json
import os

import common

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

PAD_ID = 0  # token ids in the batch are >= 1, so Tunix's masks (ids != pad) are all true
EOS_ID = -1  # unused by the training step (no eos in the fixed batch)


def grpo_trainer(model, lr: float, group_size: int):
    """An actor trainer with the loss GRPOLearner.__init__ installs (rl/grpo/grpo_learner.py)."""
    from tunix.rl import function_registry
    from tunix.rl import trainer as rl_trainer
    from tunix.rl.grpo import grpo_learner
    from tunix.sft import peft_trainer

    algo = grpo_learner.GRPOConfig(num_generations=group_size, num_iterations=1, beta=0.0, epsilon=0.2,
                                   loss_agg_mode="token-mean")
    algo.temperature = 1.0  # GRPOLearner copies the rollout temperature here
    policy_loss_fn = function_registry.get_policy_loss_fn(algo.policy_loss_fn)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=0.0))
    trainer = rl_trainer.Trainer(model, optimizer, peft_trainer.TrainingConfig(eval_every_n_steps=10**9),
                                 custom_checkpoint_metadata_fn=dict)
    trainer.with_loss_fn(lambda model, train_example, algo_config: policy_loss_fn(
        model, train_example, algo_config=algo, pad_id=PAD_ID, eos_id=EOS_ID), has_aux=True)
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo})
    return trainer


def train_example(path: str):
    """The batch train_step.py saved, as Tunix's TrainExample (it must hold no padding)."""
    from tunix.rl.grpo import grpo_learner

    b = np.load(path)
    if not (b["prompt_mask"].all() and b["mask"].all() and b["prompt_tokens"].min() > PAD_ID
            and b["tokens"].min() > PAD_ID):
        raise ValueError("Tunix derives masks from pad ids; this comparison needs an unpadded batch "
                         "with no token id equal to the pad id.")
    return grpo_learner.TrainExample(
        prompt_ids=jnp.asarray(b["prompt_tokens"]), prompt_mask=jnp.asarray(b["prompt_mask"]),
        completion_ids=jnp.asarray(b["tokens"]), completion_mask=jnp.asarray(b["mask"]),
        advantages=jnp.asarray(b["advantages"]), ref_per_token_logps=None,
        old_per_token_logps=jnp.asarray(b["old_logp"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder with config.json and model.safetensors")
    parser.add_argument("--batch", required=True, help="npz written by benchmarks/train_step.py")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--serve", action="store_true",
                        help="after warm-up print the result line as the ready line, then answer each "
                             '{"step": true} line on stdin with one timed step until stdin closes')
    args = parser.parse_args()
    from importlib.metadata import version

    example = train_example(args.batch)
    trainer = grpo_trainer(common.tunix_qwen3(args.model)[1], args.lr,
                           group_size=int(example.completion_ids.shape[0]))
    xla_flops = nnx.jit(trainer.create_train_step_fn()).lower(
        trainer.model, trainer.optimizer, example).compile().cost_analysis().get("flops", float("nan"))
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    (loss, _, grad_norm), compile_s, _ = common.timed(train_step, example)
    second_loss = float(common.timed(train_step, example)[0][0])
    result = dict(
        loss=float(loss), grad_norm=float(grad_norm), second_loss=second_loss, compile_s=compile_s,
        xla_flops=float(xla_flops), version=version("google-tunix"), versions=common.tunix_versions("optax"),
        what="the actor trainer's jitted GRPO train step (rl.trainer.Trainer with grpo_loss_fn wired as "
             "GRPOLearner does; forward + loss + backward + AdamW via nnx.Optimizer) on the same TrainExample; "
             "GRPOLearner's rollout, reward/advantage computation and scoring passes are not part of the "
             "update and are not timed. Tunix's loss materializes the [8, 128, 32000] float32 logits of every "
             "position (prompt included) and takes the entropy metric from them.")
    if args.serve:  # the caller alternates our steps with its own
        common.serve(lambda message: dict(seconds=common.timed(train_step, example)[1]), **result)
    else:
        times = [common.timed(train_step, example)[1] for _ in range(args.repeats)]
        print(json.dumps(dict(result, median_s=float(np.median(times)), min_s=float(np.min(times)))), flush=True)


if __name__ == "__main__":
    main()
