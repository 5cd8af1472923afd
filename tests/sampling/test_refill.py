"""Slot refill (bridge/sampling/refill.py) against the static sampler as the reference: the same
tokens, masks, lengths and finish reasons (logprobs to float rounding) for greedy and seeded
sampling, rows stopping at different lengths (eos forced at a drawn length per row, a stop id,
max_new_tokens), more rows than slots, one slot, n samples per prompt in prompt order, scanned
layers, and 8 devices against one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bridge import mesh as mesh_lib
from bridge import sampling
from bridge.models import Decoder, ModelConfig
from bridge.sampling import refill as refill_lib

EOS = 1
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [42], [9, 8, 7, 6, 5], [3, 4], [60, 61, 62, 63]]
LENGTHS = np.array([1, 7, 3, 12, 2, 12, 5, 9, 4, 11, 6, 2, 8, 1, 10, 3, 12, 2, 7, 5, 9, 4, 6, 11], np.int32)


def config(scan_layers=False):
    return ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, qk_norm=True, tie_word_embeddings=True, scan_layers=scan_layers)


@pytest.fixture(scope="module")
def model():
    return Decoder(config(), rngs=nnx.Rngs(0))


def forced_eos(logits, rows, steps):
    """Row r's token LENGTHS[r] - 1 is eos and no earlier token is (a module-level processor)."""
    last = jnp.asarray(LENGTHS)[rows % len(LENGTHS)] - 1
    vocab = jnp.arange(logits.shape[-1])[None]
    at = (steps == last)[:, None]
    logits = jnp.where(at, jnp.where(vocab == EOS, 0.0, -jnp.inf), logits)
    return jnp.where(~at & (vocab == EOS), -jnp.inf, logits)


def assert_same(want, got):
    for field in ("tokens", "mask", "lengths", "finish_reason", "prompt_tokens", "prompt_mask"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field)), err_msg=field)
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-5, atol=1e-5)


SETTINGS = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=1.0, top_p=0.9, seed=3),
    "sampled_n3": dict(temperature=0.8, top_k=20, seed=5, n=3),
}


@pytest.mark.parametrize("slots", [1, 3, 8])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_refill_equals_static(model, setting, slots):
    kw = dict(max_new_tokens=12, eos_ids=(EOS,), processor=forced_eos, **SETTINGS[setting])
    want = sampling.generate(model, PROMPTS, **kw)
    got = sampling.generate(model, PROMPTS, refill=slots, refill_chunk=4, **kw)
    assert_same(want, got)
    lengths = np.asarray(want.lengths)
    # the forcing works (rows stop at different lengths, some at max_new_tokens) and rows are
    # prompt-major: row b * n + j holds prompt b
    n = kw.get("n", 1)
    np.testing.assert_array_equal(lengths, LENGTHS[:len(PROMPTS) * n])
    assert set(np.asarray(want.finish_reason)) == {sampling.FINISH_EOS}
    for b, p in enumerate(PROMPTS):
        for j in range(n):
            assert list(np.asarray(got.prompt_tokens)[b * n + j][np.asarray(got.prompt_mask)[b * n + j]]) == p


def test_refill_without_processor_stop_ids_and_length_cap(model):
    """Natural sampling: per-prompt stop ids, eos ids and max_new_tokens end rows; n = 2."""
    kw = dict(max_new_tokens=10, eos_ids=(7, 11), temperature=1.0, seed=1, n=2,
              stop_ids=[[3], [4, 5], [], [6], [8], [9]])
    want = sampling.generate(model, PROMPTS, **kw)
    assert len(set(np.asarray(want.lengths))) > 2
    assert set(np.asarray(want.finish_reason)) == {sampling.FINISH_EOS, sampling.FINISH_LENGTH}
    for slots, chunk in ((2, 3), (5, 32)):
        assert_same(want, sampling.generate(model, PROMPTS, refill=slots, refill_chunk=chunk, **kw))


def test_short_cache_shifts(model):
    """Many rows through two slots with chunk 1: the cache is shifted almost every round, and
    max_new_tokens 1 (every row ends at its first token)."""
    prompts = PROMPTS * 3
    for new in (1, 9):
        kw = dict(max_new_tokens=new, eos_ids=(EOS,), temperature=1.0, seed=2, processor=forced_eos)
        assert_same(sampling.generate(model, prompts, **kw),
                    sampling.generate(model, prompts, refill=2, refill_chunk=1, **kw))


def test_scanned_layers(model):
    scanned = Decoder(config(scan_layers=True), rngs=nnx.Rngs(0))
    kw = dict(max_new_tokens=12, eos_ids=(EOS,), temperature=1.0, seed=4, n=2, processor=forced_eos)
    assert_same(sampling.generate(scanned, PROMPTS, **kw), sampling.generate(scanned, PROMPTS, refill=4, **kw))


def test_sharded_on_8_devices_equals_one_device(model):
    kw = dict(max_new_tokens=12, eos_ids=(EOS,), temperature=1.0, seed=6, n=2, processor=forced_eos)
    want = sampling.generate(model, PROMPTS, **kw)
    mesh = mesh_lib.make_mesh((2, 2, 2))
    got = sampling.generate(model, PROMPTS, refill=5, refill_chunk=4, mesh=mesh, **kw)  # 5 slots -> 8 (shards)
    assert_same(want, got)


def test_seeded_rows_do_not_depend_on_the_batch(model):
    """Per-row keys: a prompt's samples are the same alone and in a batch (static path too)."""
    kw = dict(max_new_tokens=8, temperature=1.0, seed=9, n=2)
    batch = sampling.generate(model, PROMPTS[:2], **kw)
    alone = sampling.generate(model, PROMPTS[:1], **kw)
    np.testing.assert_array_equal(np.asarray(batch.tokens)[:2], np.asarray(alone.tokens))


def test_proxy_refill_equals_static(model):
    expert, anti = Decoder(config(), rngs=nnx.Rngs(1)), Decoder(config(), rngs=nnx.Rngs(2))
    kw = dict(max_new_tokens=8, eos_ids=(EOS,), temperature=1.0, seed=3, proxy=(expert, anti, 0.5))
    assert_same(sampling.generate(model, PROMPTS, **kw), sampling.generate(model, PROMPTS, refill=3, **kw))


def test_repeated_calls_compile_once(model):
    kw = dict(max_new_tokens=6, eos_ids=(EOS,), temperature=1.0, processor=forced_eos, refill=2)
    sampling.generate(model, PROMPTS, seed=1, **kw)
    sampler = next(s for k, s in sampling.sampler._SAMPLERS.items()
                   if k[0] == "refill" and k[2].max_new_tokens == 6)
    assert isinstance(sampler, refill_lib.RefillSampler)
    sizes = (sampler._decode._cache_size(), sampler._refill._cache_size(), sampler._shift._cache_size())
    sampling.generate(model, [[7] * 6] * 5 + [[8] * 11], seed=2, **kw)  # same buckets: 6 prompts, length 12
    assert (sampler._decode._cache_size(), sampler._refill._cache_size(), sampler._shift._cache_size()) == sizes
