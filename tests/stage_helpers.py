"""Shared by the stage tests: tiny models, a hand-built batch, teacher-forced reference
logprobs from materialized logits, and the smoke config cut to a list of stages."""

import numpy as np
from flax import nnx

from bridge import models
from configs.sparse_to_dense import toy


def tiny_decoder(tokenizer, seed=0):
    """A 1-layer Qwen3-shaped decoder over `tokenizer`'s vocabulary (its eos/bos ids set)."""
    cfg = models.ModelConfig(family="qwen3", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                             num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True,
                             tie_word_embeddings=True, rope_theta=1e4, max_position_embeddings=512,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return models.Decoder(cfg, rngs=nnx.Rngs(seed))


def tiny_model(seed=0, layers=1, vocab=23):
    cfg = models.ModelConfig(family="qwen3", vocab_size=vocab, hidden_size=16, intermediate_size=32,
                             num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)
    return models.Decoder(cfg, rngs=nnx.Rngs(seed))


def hand_batch(rows=8, p=5, n=7, vocab=23, seed=0):
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((rows, p), bool)
    prompt_mask[0, :2] = False
    mask = np.ones((rows, n), bool)
    mask[1, 4:] = False
    mask[2, :] = False
    return {"prompt_tokens": rng.integers(0, vocab, (rows, p)).astype(np.int32), "prompt_mask": prompt_mask,
            "tokens": rng.integers(0, vocab, (rows, n)).astype(np.int32), "mask": mask,
            "old_logp": -rng.uniform(1, 4, (rows, n)).astype(np.float32),
            "ref_logp": -rng.uniform(1, 4, (rows, n)).astype(np.float32),
            "advantages": rng.normal(size=rows).astype(np.float32),
            "row_weight": np.array([1, 1, 1, 0] + [1] * (rows - 4), np.float32),
            "tis_weight": rng.uniform(0.5, 1.0, (rows, n)).astype(np.float32),
            "token_weight": np.ones((rows, n), np.float32)}


def reference_logp(model, batch, temperature=1.0):
    """Materialized logits -> log_softmax -> gather (independent of bridge.kernels.logprobs)."""
    seq = np.concatenate([batch["prompt_tokens"], batch["tokens"]], 1)
    att = np.concatenate([batch["prompt_mask"], np.ones_like(batch["mask"])], 1)
    p = batch["prompt_tokens"].shape[1]
    logits = np.asarray(model(seq, attention_mask=att))[:, p - 1:-1] / temperature
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, batch["tokens"][..., None], -1)[..., 0] - logz
    return logits, logp


def smoke_config(stages, **stage_overrides):
    c = toy.get_config("smoke")
    with c.unlocked():
        c.pipeline.stages = tuple(stages)
        c.pipeline.c1_stage = c.pipeline.c2_stage = ""
        c.metrics.plots = False
        for path, value in stage_overrides.items():  # "opd__sampling__top_p": c.stages.opd.sampling.top_p
            *keys, last = path.split("__")
            node = c
            for key in ["stages", *keys]:
                node = node[key]
            node[last] = value
    return c


def one_update(kind, scfg, module, batch, keys, devices):
    """One update step of `kind` on `module` with the `keys` of `batch` placed on a (1, -1, 1)
    mesh of `devices`: (new params, metrics) on the host, for 1-vs-8-device comparisons."""
    import jax
    import jax.numpy as jnp

    from bridge import mesh as mesh_lib, sharding, train_state
    from bridge.stages import common

    mesh = mesh_lib.make_mesh((1, -1, 1), devices=devices)
    graphdef, params = nnx.split(module)
    tx = common.optimizer(scfg, 1)
    state = train_state.init_state(params, tx)
    shardings = train_state.state_shardings(state, mesh, None)
    state = jax.device_put(state, shardings)
    step = common.make_update(kind, scfg, graphdef, (), tx, shardings)
    with jax.set_mesh(mesh):
        placed = {k: jax.device_put(jnp.asarray(batch[k]), sharding.batch_sharding(mesh, np.ndim(batch[k]),
                                                                                  shape=np.shape(batch[k])))
                  for k in keys}
        new, metrics = step(state, placed, None)
    return jax.device_get(new.params), jax.device_get(metrics)


def stage_records(workdir, stage):
    """The update records (those with a loss) of one unit, from metrics.jsonl."""
    import json

    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if r["stage"] == stage and "loss" in r]
