"""Proxy-tuning from a config: greedy decoding through a stage's `sampling.proxy` (models by
slot and by "hf:" reference) and through `launch.eval --proxy_*` equals a hand loop of
argmax(base + alpha * (expert - antiexpert)) over full-sequence logits (no KV cache, one model
call per token); a larger base with smaller experts, as proxy-tuning is used; the checks on
the pair (both models, one vocabulary)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from bridge import models, runtime
from bridge.stages import common as stage_common
from configs import common

ALPHABET = "0123456789+="
ALPHA = 2.0
MAX_NEW = 6
WIDTH = 16  # prompt (6 characters) + MAX_NEW, rounded up
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = dict(digits=2, num_train=4, num_test=4, seed=0)


def _decoder(tokenizer, seed, layers, hidden, vocab=None):
    cfg = models.ModelConfig(family="qwen3", vocab_size=vocab or len(tokenizer), hidden_size=hidden,
                             intermediate_size=2 * hidden, num_layers=layers, num_heads=2, num_kv_heads=1,
                             head_dim=hidden // 2, qk_norm=True, tie_word_embeddings=False, rope_theta=1e4,
                             max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id)
    return models.Decoder(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """(tokenizer, {role: model}, {role: folder}): a 2-layer base, 1-layer expert and anti-expert."""
    tokenizer = models.char_tokenizer(ALPHABET)
    root = tmp_path_factory.mktemp("proxy_trio")
    built = {"base": _decoder(tokenizer, 0, 2, 32), "expert": _decoder(tokenizer, 1, 1, 16),
             "antiexpert": _decoder(tokenizer, 2, 1, 16)}
    paths = {}
    for role, model in built.items():
        paths[role] = str(root / role)
        models.save_hf(model, paths[role], tokenizer=tokenizer)
    return tokenizer, built, paths


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _hand_greedy(base, expert, antiexpert, alpha, prompt, eos, max_new=MAX_NEW):
    """Greedy tokens of argmax(l_base + alpha * (l_expert - l_antiexpert)), each step from the
    full sequence so far (float64 combination; the lowest index wins a tie)."""
    seq, out = list(prompt), []
    for _ in range(max_new):
        # Right padding to one width (one compilation per model): causal attention keeps the
        # logits at the last real position those of the sequence alone.
        padded = np.array([seq + [0] * (max(WIDTH, len(prompt) + max_new) - len(seq))], np.int32)
        last = [np.asarray(_forward(m, padded), np.float64)[0, len(seq) - 1] for m in (base, expert, antiexpert)]
        z = last[0] + alpha * (last[1] - last[2])
        top = np.sort(z)[-2:]
        assert top[1] - top[0] > 1e-4, "a near tie: pick other seeds"
        token = int(np.argmax(z))
        out.append(token)
        seq.append(token)
        if token in eos:
            break
    return out


def _context(tmp_path, tokenizer_dir):
    cfg = common.base()
    cfg.tokenizer = "char:" + ALPHABET
    cfg.task = common.cd(name="arithmetic", options=common.cd(**TASK))
    cfg.models.expert = common.cd(hf_dir=tokenizer_dir, arch=common.cd())
    cfg.metrics.update(tensorboard=False, progress=False)
    return runtime.make_context(cfg, str(tmp_path))


def test_stage_sampling_proxy_equals_a_hand_loop(trio, tmp_path):
    tokenizer, built, paths = trio
    ctx = _context(tmp_path, paths["expert"])
    # The expert by slot (config.models.expert), the anti-expert by "hf:" reference.
    sc = common.sampling(1, temperature=0.0, max_new_tokens=MAX_NEW,
                         proxy=common.cd(expert="expert", antiexpert="hf:" + paths["antiexpert"], alpha=ALPHA))
    examples = list(ctx.task.examples("test"))
    roll = stage_common.sample_rollout(ctx, ctx.model("hf:" + paths["base"]), examples, sc, seed=0)
    eos = set(ctx.eos_ids)
    changed = 0
    for r, example in enumerate(examples):
        prompt = ctx.task.prompt_ids(example, tokenizer)
        want = _hand_greedy(built["base"], built["expert"], built["antiexpert"], ALPHA, prompt, eos)
        assert list(roll.tokens[r][roll.mask[r]]) == want, (r, want)
        plain = _hand_greedy(built["base"], built["expert"], built["antiexpert"], 0.0, prompt, eos)
        changed += want != plain
    assert changed, "alpha * (expert - antiexpert) changed no decode; the test would not see a missing proxy"
    # The same through the stage's sampler with the proxy off is the base alone.
    sc.proxy.expert = sc.proxy.antiexpert = ""
    off = stage_common.sample_rollout(ctx, ctx.model("hf:" + paths["base"]), examples, sc, seed=0)
    for r, example in enumerate(examples):
        prompt = ctx.task.prompt_ids(example, tokenizer)
        assert list(off.tokens[r][off.mask[r]]) == _hand_greedy(built["base"], built["expert"], built["antiexpert"],
                                                                0.0, prompt, eos)


def test_proxy_needs_both_models_and_one_vocabulary(trio, tmp_path):
    tokenizer, _, paths = trio
    ctx = _context(tmp_path, paths["expert"])
    base = ctx.model("hf:" + paths["base"])
    examples = list(ctx.task.examples("test"))[:1]
    half = common.sampling(1, temperature=0.0, max_new_tokens=2, proxy=common.cd(expert="expert", antiexpert="",
                                                                                  alpha=1.0))
    with pytest.raises(ValueError, match="both an expert and an anti-expert"):
        stage_common.sample_rollout(ctx, base, examples, half, seed=0)
    wide = str(tmp_path / "wide")
    models.save_hf(_decoder(tokenizer, 3, 1, 16, vocab=len(tokenizer) + 5), wide)
    bad = common.sampling(1, temperature=0.0, max_new_tokens=2,
                          proxy=common.cd(expert="expert", antiexpert="hf:" + wide, alpha=1.0))
    with pytest.raises(ValueError, match=rf"antiexpert 'hf:.*wide' has {len(tokenizer) + 5} tokens, the sampled "
                                         rf"model {len(tokenizer)}"):
        stage_common.sample_rollout(ctx, base, examples, bad, seed=0)


def _eval(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "launch.eval", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_launch_eval_with_proxy_flags_equals_a_hand_loop(trio, tmp_path):
    tokenizer, built, paths = trio
    outdir = str(tmp_path / "eval")
    proc = _eval(f"--hf_dir={paths['base']}", "--task=arithmetic", f"--task_options={json.dumps(TASK)}", "--n=1",
                 "--temperature=0", "--top_p=1", "--top_k=0", f"--max_new_tokens={MAX_NEW}", "--progress=false",
                 f"--proxy_expert={paths['expert']}", f"--proxy_antiexpert=hf:{paths['antiexpert']}",
                 f"--proxy_alpha={ALPHA}", f"--outdir={outdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(os.path.join(outdir, "results.json")))
    assert results["proxy"]["alpha"] == ALPHA and results["method"] == "base+proxy(expert)"
    samples = [json.loads(x) for x in open(os.path.join(outdir, "samples.jsonl"))]
    from bridge.tasks import get_task
    examples = {e.id: e for e in get_task("arithmetic", **TASK).examples("test")}
    eos = {tokenizer.eos_token_id}
    assert len(samples) == len(examples)
    for sample in samples:
        prompt = [int(i) for i in tokenizer.encode(examples[sample["id"]].prompt, add_special_tokens=False)]
        want = _hand_greedy(built["base"], built["expert"], built["antiexpert"], ALPHA, prompt, eos)
        assert sample["completion"] == tokenizer.decode([t for t in want if t not in eos])

    proc = _eval(f"--hf_dir={paths['base']}", "--task=arithmetic", f"--task_options={json.dumps(TASK)}",
                 f"--proxy_expert={paths['expert']}", f"--outdir={outdir}2")
    assert proc.returncode == 2 and "needs both --proxy_expert and --proxy_antiexpert" in proc.stderr


@pytest.mark.slow
def test_proxy_config_runs_end_to_end_and_its_pool_is_proxy_tuned(tmp_path):
    """configs/self_distill/toy.py:proxy,smoke,distill (proxy.py's config) through launch.train: the expert's SFT and
    RL, the base's SFT, and base_distill, whose teacher pool is greedy proxy-tuned sampling of
    the base (the proxy pair as stage:* references). Smoke RL leaves the expert equal to its SFT self (no correct
    rollout, zero advantages), so the test names base_sft as the anti-expert: the pool must be
    argmax((1 - alpha) base + alpha expert_rl) by the hand loop over the exported models."""
    from launch_helpers import run_train

    proc = run_train("configs/self_distill/toy.py:proxy,smoke,distill", tmp_path,
                     "--config.stages.base_distill.sampling.proxy.antiexpert=stage:base_sft",
                     "--config.stages.base_distill.sampling.proxy.alpha=0.7", "--config.metrics.plots=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("expert_sft", "expert_rl", "base_sft", "base_distill"):
        assert (tmp_path / "models" / stage / runtime.DONE).exists(), stage
    load = lambda stage: models.load_hf(str(tmp_path / "models" / stage))  # noqa: E731
    base, expert, anti = load("base_sft"), load("expert_rl"), load("base_sft")
    tokenizer = models.load_tokenizer(str(tmp_path / "models" / "base_sft"))
    pool = dict(np.load(tmp_path / "stages" / "base_distill" / "pool.npz"))
    eos = {tokenizer.eos_token_id}
    changed = 0
    for r in range(4):
        prompt = [int(t) for t in pool["prompt_tokens"][r][pool["prompt_mask"][r]]]
        want = _hand_greedy(base, expert, anti, 0.7, prompt, eos, max_new=8)
        assert [int(t) for t in pool["tokens"][r][pool["mask"][r]]] == want, r
        changed += want != _hand_greedy(base, expert, anti, 0.0, prompt, eos, max_new=8)
    assert changed, "the proxy changed no decode; the test would not see it missing"
