"""One whole GRPO step (rollout, scoring, rewards, advantages, update): bridge vs Tunix 0.1.7's GRPOLearner.

Workload (issue 20): a random Qwen3 of `common.QWEN3_TOY`'s shape with *untied* embeddings (4 layers,
hidden 256, MLP 768, 4 heads / 2 kv heads x 64, vocab 32000, float32), initialized by bridge (seed 0)
and saved as safetensors that both sides load. 8 prompts of 16 random token ids in [2, V) x 4 samples,
up to 64 new tokens at T = 0.9, eos id 1, pad id 0; reward = the fraction of even token ids in the
completion (eos included, padding not); GRPO advantages (group mean / std), clipped surrogate 0.2/0.2,
token-mean, k3 KL to a frozen reference (the initial weights) as a loss term with beta 0.04, one AdamW
update per step (b1 0.9, b2 0.99, wd 0, global-norm clip 1.0), lr 1e-6.

bridge's step is the rl stage's (`bridge/stages/rl.py` `loop.step`) without a `runtime.Context`:
`sampling.generate` (n = 4, seed = the step), the rollout to the host, rewards, then the stage's
jitted scorers (`scoring.completion_logprobs` of the policy with entropy, and of the reference), GRPO
advantages (`advantages.advantage_estimator("grpo")`), then `train_state.make_update_step` with
`rl.make_loss_fn(rl_stage(..., kl_coef=0.04, kl_kind="k3", kl_mode="loss"))`. Phases, each ended by
`jax.block_until_ready` (or a host fetch):
  rollout = generate + tokens to the host; scoring = old + reference logprobs, rewards, advantages;
  update = the optimizer update (metrics fetched).
Tunix's side: benchmarks/rl_step_tunix.py (a `common.TunixPeer` in /work/tunix-venv), see there.

Both sides run steps 1-4, alternating one step each (`common.alternate`); step 1 compiles; the table
reports steps 2-4 (mean) and each step. XLA compilations per step on bridge's side are counted with a
`jax.monitoring` listener (backend compiles), so a recompilation after step 1 shows in the table.

    .venv/bin/python benchmarks/rl_step_vs_tunix.py [--no-tunix]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import common

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bridge import advantages as adv_lib, losses, sampling, scoring, train_state  # noqa: E402
from bridge.models import Decoder, save_hf  # noqa: E402
from bridge.sampling import processors  # noqa: E402
from bridge.stages import rl  # noqa: E402
from configs.common import rl_stage, sampling as sampling_cfg  # noqa: E402

PROMPTS, PROMPT_LEN, GROUP = 8, 16, 4
NEW_TOKENS, TEMPERATURE, EOS_ID, PAD_ID = 64, 0.9, 1, 0
BETA, LR, STEPS = 0.04, 1e-6, 4
MODEL = common.model_config(tie_word_embeddings=False)
PHASES = ("rollout", "scoring", "update")


def stage_config():
    return rl_stage("policy", lr=LR, steps=STEPS, prompts_per_step=PROMPTS, kl_coef=BETA, kl_kind="k3",
                    kl_mode="loss", sampling=sampling_cfg(GROUP, temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS))


def make_prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(2, MODEL.vocab_size, (PROMPTS, PROMPT_LEN)).tolist()


def even_fraction(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reward per row: the fraction of even token ids among the completion's tokens (mask)."""
    even = ((tokens % 2 == 0) & mask).sum(1)
    return (even / np.maximum(mask.sum(1), 1)).astype(np.float32)


class Compiles:
    """Counts XLA backend compilations (jax.monitoring), to show recompilation after step 1."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


class BridgeRL:
    """The rl stage's step on one model, one phase timed at a time."""

    def __init__(self, path: str, prompts):
        from bridge.models import load_hf

        self.scfg = scfg = stage_config()
        self.prompts = prompts
        model = load_hf(path)  # the same safetensors Tunix loads
        self.graphdef, params = nnx.split(model)
        self.reference = jax.tree.map(jnp.copy, params)
        tx = train_state.make_optimizer(scfg.optimizer)
        self.update = train_state.make_update_step(self.graphdef, rl.make_loss_fn(scfg), tx,
                                                   microbatch_weight=rl.microbatch_weight(scfg))
        self.state = train_state.init_state(jax.tree.map(jnp.copy, params), tx)
        temp = processors.scoring_temperature(TEMPERATURE)
        g = self.graphdef
        self.score = jax.jit(lambda p, b: scoring.completion_logprobs(nnx.merge(g, p), b, temp, return_entropy=True))
        self.score_ref = jax.jit(lambda p, b: scoring.completion_logprobs(nnx.merge(g, p), b, temp))
        self.estimator = adv_lib.advantage_estimator("grpo")
        self.compiles = Compiles()
        self.step_index = 0

    def step(self) -> dict:
        self.step_index += 1
        compiles0 = self.compiles.count
        t0 = time.perf_counter()
        out = sampling.generate(nnx.merge(self.graphdef, self.state.params), self.prompts,
                                max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, eos_ids=(EOS_ID,),
                                pad_id=PAD_ID, n=GROUP, seed=self.step_index)
        host = jax.device_get({"prompt_tokens": out.prompt_tokens, "prompt_mask": out.prompt_mask,
                               "tokens": out.tokens, "mask": out.mask, "lengths": out.lengths})
        t1 = time.perf_counter()
        batch = {k: jnp.asarray(host[k]) for k in ("prompt_tokens", "prompt_mask", "tokens", "mask")}
        old_logp, entropy = self.score(self.state.params, batch)
        ref_logp = self.score_ref(self.reference, batch)
        rewards = even_fraction(host["tokens"], host["mask"])
        adv = np.asarray(self.estimator(jnp.asarray(rewards), GROUP), np.float32)
        seq_kl = np.asarray(jnp.sum(losses.kl_estimate(old_logp, ref_logp, "k3") * batch["mask"], 1))
        batch.update(ref_logp=ref_logp, old_logp=old_logp, advantages=jnp.asarray(adv),
                     row_weight=jnp.ones((len(rewards),), jnp.float32), tis_weight=jnp.ones_like(old_logp))
        jax.block_until_ready(batch)
        entropy_mean = float(losses.masked_mean(entropy, batch["mask"]))
        t2 = time.perf_counter()
        self.state, metrics = self.update(self.state, batch, None)
        metrics = jax.device_get(metrics)
        t3 = time.perf_counter()
        return dict(rollout=t1 - t0, scoring=t2 - t1, update=t3 - t2, total=t3 - t0,
                    compiles=self.compiles.count - compiles0, reward=float(rewards.mean()),
                    length=float(host["lengths"].mean()), loss=float(metrics["loss"]),
                    kl=float(metrics.get("kl_ref", np.nan)), seq_kl=float(seq_kl.mean()), entropy=entropy_mean)


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def report(bridge: list[dict], tunix: list[dict] | None, tunix_info: dict, load: str) -> None:
    later = slice(1, STEPS)

    def mean(rows, key):
        vals = [r.get(key) for r in rows[later]]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    table = ["| side | phase | step 1 s | step 2 s | step 3 s | step 4 s | mean of steps 2-4 s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    sides = [("bridge", bridge)] + ([("Tunix", tunix)] if tunix else [])
    for name, rows in sides:
        for phase in ("rollout", "scoring", "rewards", "update", "other", "total"):
            if all(r.get(phase) is None for r in rows):
                continue
            table.append(f"| {name} | {phase} | " + " | ".join(fmt(r.get(phase)) for r in rows)
                         + f" | {fmt(mean(rows, phase))} |")
    body = [*table, ""]
    body.append("bridge XLA compilations per step: " + ", ".join(str(r["compiles"]) for r in bridge) + ".")
    body.append("bridge per step (reward mean, completion length mean, loss, KL term): " + "; ".join(
        f"{r['reward']:.3f}, {r['length']:.1f}, {r['loss']:.5f}, {r['kl']:.2e}" for r in bridge) + ".")
    if tunix:
        body.append("Tunix per step (reward mean, completion length mean): " + "; ".join(
            f"{r.get('reward', float('nan')):.3f}, {r.get('length', float('nan')):.1f}" for r in tunix) + ".")
        full = all(r.get("length") == NEW_TOKENS for r in [*bridge, *tunix])
        body.append("Tunix's RolloutConfig.seed is left at None, so its sampler draws with the same seed each step "
                    "(its rewards barely move); bridge seeds each step's rollout with the step number."
                    + (f" Neither changes the work: every row of both sides ran to {NEW_TOKENS} tokens (no eos drawn)."
                       if full else ""))
        ratio = mean(bridge, "total") / mean(tunix, "total")
        body += ["", f"**bridge / Tunix step time, steps 2-4 (mean): {ratio:.2f}x**; Tunix / bridge (speed-up): "
                 f"{1 / ratio:.2f}x. Issue target '1.5x Tunix's step time or better' read as bridge's time <= 1.5 x "
                 f"Tunix's: {'met' if ratio <= 1.5 else 'not met'}; read as a 1.5x speed-up: "
                 f"{'met' if ratio <= 1 / 1.5 else 'not met'}."]
        body += ["", f"Tunix ({tunix_info.get('versions', '')}): {tunix_info.get('what', '')}",
                 "", "Phases. bridge: rollout = `sampling.generate` + the rollout to the host; scoring = the policy's "
                 "old logprobs with entropy and the reference's logprobs (two forward passes), rewards, advantages; "
                 "update = the jitted update. Tunix: rollout = `RLCluster.generate`; scoring = the reference's "
                 "logprobs only (one forward pass; at num_iterations=1 Tunix uses the current policy's logprobs, "
                 "stop-gradient, as the old ones); rewards = the reward function; update = "
                 "`RLCluster.update_actor`; other = the rest of the step."]
    else:
        body += ["", f"Tunix could not be measured: {tunix_info.get('error')}."]
    intro = [f"Model: {common.describe_model(MODEL)}, float32, untied embeddings, initialized by bridge (seed 0) and "
             "loaded from the same safetensors by both sides. Step: 8 prompts of 16 random ids x 4 samples, up to "
             "64 new tokens at T = 0.9 (eos 1), reward = fraction of even completion ids, GRPO advantages, "
             "clipped surrogate 0.2/0.2 token-mean + 0.04 * k3 KL to the initial weights, one AdamW update "
             "(lr 1e-6, clip 1.0). Steps 1-4 on each side, alternating one step each; step 1 compiles. Method: "
             "the docstrings of `benchmarks/rl_step_vs_tunix.py` and `benchmarks/rl_step_tunix.py`."]
    common.write_report("rl_step_vs_tunix", "Whole GRPO step: bridge vs Tunix GRPOLearner (CPU, float32)", intro,
                        body, common.jax_versions() + " (XLA's default CPU thread pool, every core)", load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-tunix", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    prompts = make_prompts()
    error = "skipped (--no-tunix)" if args.no_tunix else common.tunix_venv_missing()
    tunix, info = None, {"error": error}
    with tempfile.TemporaryDirectory() as path:
        save_hf(Decoder(MODEL, rngs=nnx.Rngs(0)), path)
        with open(os.path.join(path, "prompts.json"), "w") as f:
            json.dump(prompts, f)
        bridge = BridgeRL(path, prompts)
        if error is None:
            tunix = common.TunixPeer("rl_step_tunix.py", "--serve", "--model", path, "--prompts",
                                     os.path.join(path, "prompts.json"))
        try:
            sides = {"bridge": bridge.step}
            if tunix is not None:
                with contextlib.suppress(RuntimeError):
                    info = tunix.ready()
                    sides["tunix"] = lambda: tunix.request(step=True)

            def logged(name, fn):
                def run():
                    r = fn()
                    print(name, json.dumps(r), flush=True)
                    return r
                return run

            results = common.alternate({k: logged(k, v) for k, v in sides.items()}, STEPS)
        except RuntimeError as e:
            results, info = {"bridge": results["bridge"] if "results" in dir() else []}, {"error": str(e)}
        finally:
            if tunix is not None:
                tunix.close()
    report(results["bridge"], results.get("tunix"), info, common.load_note(load_before))


if __name__ == "__main__":
    main()
