"""Sampler: parity with transformers greedy generate, logprobs vs teacher forcing, eos/mask
handling, n samples per prompt, seeds, sharding, proxy-tuning and compilation caching."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_fixtures
from bridge import mesh as mesh_lib
from bridge import models, sampling

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 8, 7, 6, 5]]


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    return path, hf_fixtures.tiny_hf_model(path, "qwen3")


@pytest.fixture(scope="module")
def qwen3(qwen3_path):
    path, torch_model = qwen3_path
    return torch_model, models.load_hf(str(path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch_model = hf_fixtures.tiny_hf_model(path, "llama")
    return torch_model, models.load_hf(str(path))


def hf_greedy(torch_model, prompts, n_new):
    """transformers greedy generate on a left-padded batch, exactly n_new tokens."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return out[:, width:].numpy()


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def teacher_forced_logits(model, out):
    """Logits at the positions that predicted each new token, from one pass over prompt+completion."""
    ids = np.concatenate([np.asarray(out.prompt_tokens), np.asarray(out.tokens)], axis=1)
    mask = np.concatenate([np.asarray(out.prompt_mask), np.asarray(out.mask)], axis=1)
    logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    p = out.prompt_tokens.shape[1]
    return logits[:, p - 1:-1]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_equals_transformers(family, request):
    torch_model, model = request.getfixturevalue(family)
    n_new = 8
    ours = np.asarray(sampling.generate(model, PROMPTS, max_new_tokens=n_new, temperature=0.0).tokens)
    theirs = hf_greedy(torch_model, PROMPTS, n_new)
    assert np.mean(ours == theirs) >= 0.95
    # exactly, one prompt at a time with no padding on the transformers side
    for i, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(ours[i], hf_greedy(torch_model, [p], n_new)[0])


def test_greedy_single_prompt_equals_transformers(tmp_path):
    """Batch 1 compiles its own shapes. jax 0.10.2's CPU backend miscompiles a broadcast-multiply-
    reduce attention at batch 1 with >= 2 kv heads, >= 2 query heads per kv head and head_dim >= 32,
    hence this shape."""
    torch_model = hf_fixtures.tiny_hf_model(tmp_path, "qwen3", head_dim=32)
    model = models.load_hf(str(tmp_path))
    ours = np.asarray(sampling.generate(model, PROMPTS[1:2], max_new_tokens=8, temperature=0.0).tokens)
    np.testing.assert_array_equal(ours[0], hf_greedy(torch_model, PROMPTS[1:2], 8)[0])


def test_greedy_has_no_near_ties(qwen3):
    """Guards the exact-equality case: every greedy step wins by a clear margin."""
    _, model = qwen3
    out = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    top2 = np.sort(teacher_forced_logits(model, out), axis=-1)[..., -2:]
    assert np.min(top2[..., 1] - top2[..., 0]) > 1e-3


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.7),
                                      dict(temperature=1.2, top_k=7, top_p=0.9)])
def test_logprobs_equal_teacher_forced_scoring(qwen3, settings):
    """Each token is drawn from the truncated distribution (it lies in the kept set), and its
    reported logprob is log_softmax(logits / T)[token] before truncation: what the trainer
    recomputes, so pi_trainer / pi_sampler is 1 up to numerics, whatever top-k/top-p do."""
    _, model = qwen3
    out = sampling.generate(model, PROMPTS, max_new_tokens=8, seed=3, n=2, **settings)
    z = teacher_forced_logits(model, out)
    t = settings["temperature"]
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    if t > 0:
        z = z / np.float32(t)
    if "top_k" in settings:  # the same filters, written independently: tokens lie in the kept set
        kth = np.sort(z, axis=-1)[..., -settings["top_k"]][..., None]
        kept = np.where(z >= kth, z, -np.inf)
        probs = np.exp(np_log_softmax(kept))
        order = np.argsort(-kept, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p
        last_kept = np.take_along_axis(kept, order, -1)
        threshold = np.min(np.where(before < settings["top_p"], last_kept, np.inf), -1, keepdims=True)
        kept = np.where(kept >= threshold, kept, -np.inf)
        assert np.all(np.isfinite(np.take_along_axis(kept, tokens[..., None], -1)[..., 0])[mask])
        assert np.mean(np.isfinite(kept)) < 0.5  # the filters did cut the vocabulary
    want = np.take_along_axis(np_log_softmax(z), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], want[mask], atol=1e-4, rtol=0)
    assert np.all(np.asarray(out.logprobs)[~mask] == 0)


def test_eos_and_mask_for_rows_stopping_at_different_steps(qwen3):
    _, model = qwen3
    free = np.asarray(sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=0.0).tokens)
    eos = (int(free[0, 2]), int(free[1, 5]))
    out = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=0.0, eos_ids=eos, pad_id=0)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    stops = np.isin(free, eos)
    for r in range(len(PROMPTS)):
        first = int(np.argmax(stops[r])) if stops[r].any() else None
        length = 8 if first is None else first + 1
        assert out.lengths[r] == length
        assert out.finish_reason[r] == (sampling.FINISH_LENGTH if first is None else sampling.FINISH_EOS)
        np.testing.assert_array_equal(mask[r], np.arange(8) < length)
        np.testing.assert_array_equal(tokens[r, :length], free[r, :length])
        assert np.all(tokens[r, length:] == 0)
    assert out.lengths[0] <= 3 and out.lengths[1] <= 6 and len(set(np.asarray(out.lengths))) > 1


def test_early_exit_when_all_rows_finish(qwen3):
    _, model = qwen3
    first = int(np.asarray(sampling.generate(model, [[3, 4]], max_new_tokens=1, temperature=0.0).tokens)[0, 0])
    out = sampling.generate(model, [[3, 4]] * 3, max_new_tokens=8, temperature=0.0, eos_ids=(first,))
    np.testing.assert_array_equal(np.asarray(out.lengths), [1, 1, 1])
    assert np.all(np.asarray(out.tokens)[:, 1:] == 0)


def test_prompt_outputs_are_left_padded_and_repeated(qwen3):
    _, model = qwen3
    out = sampling.generate(model, PROMPTS, max_new_tokens=8, n=2, seed=3, temperature=0.7)
    p = out.prompt_tokens.shape[1]
    assert p == sampling.bucket(max(map(len, PROMPTS)), sampling.sampler.PROMPT_BUCKET_MIN)
    assert out.tokens.shape == (8, 8)
    for r in range(8):
        prompt = PROMPTS[r // 2]
        np.testing.assert_array_equal(np.asarray(out.prompt_tokens)[r, p - len(prompt):], prompt)
        np.testing.assert_array_equal(np.asarray(out.prompt_mask)[r], np.arange(p) >= p - len(prompt))


def test_seed_reproducible_and_different_seeds_differ(qwen3):
    _, model = qwen3
    a = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    b = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    c = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=8)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_positional_arguments_in_design_order(qwen3):
    """generate(model, prompts, max_new_tokens, temperature, top_p, top_k, eos_ids, seed)."""
    _, model = qwen3
    by_name = sampling.generate(model, PROMPTS, max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=5,
                                eos_ids=[17], seed=3)
    by_position = sampling.generate(model, PROMPTS, 6, 0.8, 0.9, 5, [17], 3)
    np.testing.assert_array_equal(np.asarray(by_position.tokens), np.asarray(by_name.tokens))
    no_eos = sampling.generate(model, PROMPTS, 6, 0.0, eos_ids=None)
    assert no_eos.tokens.shape == (len(PROMPTS), 6)


def test_stop_ids_per_row(qwen3):
    """Each prompt's own stop ids end its rows (all n of them) at their first occurrence;
    other rows run on; finish reasons and lengths follow."""
    _, model = qwen3
    free = sampling.generate(model, PROMPTS, 8, 0.0, n=2)
    tokens = np.asarray(free.tokens)
    stop0 = int(tokens[0, 3])
    first = int(np.argmax(tokens[0] == stop0))
    out = sampling.generate(model, PROMPTS, 8, 0.0, n=2, stop_ids=[[stop0], [], [-5], []])
    mask, reason = np.asarray(out.mask), np.asarray(out.finish_reason)
    for row in (0, 1):  # prompt 0's two samples
        assert mask[row].sum() == first + 1 and reason[row] == sampling.FINISH_EOS
        np.testing.assert_array_equal(np.asarray(out.tokens)[row, :first + 1], tokens[row, :first + 1])
    np.testing.assert_array_equal(mask[2:], np.asarray(free.mask)[2:])
    np.testing.assert_array_equal(np.asarray(out.tokens)[2:], tokens[2:])
    with pytest.raises(ValueError, match="one list per prompt"):
        sampling.generate(model, PROMPTS, 8, 0.0, stop_ids=[[1]])


def test_top_k_1_equals_greedy(qwen3):
    _, model = qwen3
    greedy = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    top1 = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=0.9, top_k=1, seed=5)
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    # logprobs are of the untruncated T = 0.9 distribution (not log 1 = 0 of the top-1 one)
    want = np.take_along_axis(np_log_softmax(teacher_forced_logits(model, top1) / np.float32(0.9)),
                              np.asarray(top1.tokens)[..., None], -1)[..., 0]
    mask = np.asarray(top1.mask)
    np.testing.assert_allclose(np.asarray(top1.logprobs)[mask], want[mask], atol=1e-4, rtol=0)
    assert np.all(np.asarray(top1.logprobs)[mask] < 0)


def test_n_samples_share_one_prefill_and_differ(qwen3):
    _, model = qwen3
    graphdef, state = nnx.split(model)
    config = sampling.SamplingConfig(max_new_tokens=8, n=3)
    tokens, mask = sampling.left_pad(PROMPTS, 16, len(PROMPTS), 0)
    caches, logits = sampling.prefill((graphdef,), (state,), jnp.asarray(tokens), jnp.asarray(mask), config)
    k = np.asarray(caches[0].k[0])
    assert k.shape[0] == 3 * len(PROMPTS) and k.shape[2] == 16 + 8  # [rows, kv heads, slots, head dim]
    for j in range(3):  # each prompt's rows are copies of one prefill row
        np.testing.assert_array_equal(k[j::3], k[0::3])
        np.testing.assert_array_equal(np.asarray(logits)[j::3], np.asarray(logits)[0::3])
    out = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, n=3, seed=1)
    rows = np.asarray(out.tokens).reshape(len(PROMPTS), 3, 8)
    for b in range(len(PROMPTS)):
        assert len({tuple(r) for r in rows[b]}) == 3


def test_sharded_on_8_devices_equals_one_device(qwen3):
    _, model = qwen3
    assert jax.device_count() == 8
    mesh = mesh_lib.make_mesh((2, 2, 2))
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95, n=2, seed=4, eos_ids=(17,))
    single = sampling.generate(model, PROMPTS[:3], **kw)
    sharded = sampling.generate(model, PROMPTS[:3], mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_array_equal(np.asarray(sharded.mask), np.asarray(single.mask))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-5, rtol=0)


def test_cache_shards_rows_and_kv_heads_and_decode_donates_it(qwen3):
    """On a (data 2, fsdp 2, tensor 2) mesh the KV cache puts rows over (data, fsdp) and kv
    heads over tensor, the attention weights' heads over tensor; decode updates the
    prefill's cache in place (its buffers are donated)."""
    from jax.sharding import PartitionSpec as P

    from bridge import sharding

    _, model = qwen3
    mesh = mesh_lib.make_mesh((2, 2, 2))
    graphdef, state = nnx.split(model)
    config = sampling.SamplingConfig(max_new_tokens=4, n=2)
    sampler = sampling.make_sampler(graphdef, config, mesh=mesh, rules=sharding.DEFAULT_RULES)
    (state,) = sampler.place((state,))
    assert state["layers"][0]["self_attn"]["k_proj"]["kernel"][...].sharding.spec == P("fsdp", "tensor")  # heads
    tokens, mask = sampling.left_pad(PROMPTS, 16, len(PROMPTS), 0)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        caches, logits = sampler.prefill((state,), jnp.asarray(tokens), jnp.asarray(mask))
        k = caches[0].k[0]
        assert tuple(k.sharding.spec) + (None,) * (4 - len(k.sharding.spec)) == (("data", "fsdp"), "tensor", None, None)
        out, _ = sampler.decode((state,), caches, logits, jnp.asarray(tokens), jnp.asarray(mask),
                                jnp.ones((len(PROMPTS),), bool), jax.random.key(0))
    assert k.is_deleted()
    assert out.tokens.shape == (2 * len(PROMPTS), 4)


def test_min_p_through_generate_keeps_only_likely_tokens(qwen3):
    """min_p = 0.3: every sampled token had probability >= 0.3 * the step's top probability."""
    _, model = qwen3
    out = sampling.generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, min_p=0.3, n=4, seed=2)
    logits = teacher_forced_logits(model, out)
    probs = np.exp(np_log_softmax(logits))
    picked = np.take_along_axis(probs, np.asarray(out.tokens)[..., None], -1)[..., 0]
    ok = picked >= 0.3 * probs.max(-1) * (1 - 1e-5)
    assert np.all(ok[np.asarray(out.mask)])


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_scanned_layers_sample_like_unrolled(qwen3, qwen3_path, mesh_shape):
    """scan_layers keeps one stacked [L, B, Hkv, S, Dh] cache; same tokens as the unrolled model."""
    _, model = qwen3
    scanned = models.load_hf(str(qwen3_path[0]), scan_layers=True)
    mesh = None if mesh_shape is None else mesh_lib.make_mesh(mesh_shape)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.95, n=2, seed=4, eos_ids=(17,))):
        a = sampling.generate(model, PROMPTS, max_new_tokens=8, **kw)
        b = sampling.generate(scanned, PROMPTS, max_new_tokens=8, mesh=mesh, **kw)
        np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
        np.testing.assert_array_equal(np.asarray(b.mask), np.asarray(a.mask))
        np.testing.assert_allclose(np.asarray(b.logprobs), np.asarray(a.logprobs), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def proxy_models(tmp_path_factory):
    pair = []
    for seed in (1, 2):
        path = tmp_path_factory.mktemp(f"proxy{seed}")
        hf_fixtures.tiny_hf_model(path, "qwen3", seed=seed)
        pair.append(models.load_hf(str(path)))
    return pair


def test_proxy_alpha_zero_equals_plain(qwen3, proxy_models):
    _, model = qwen3
    kw = dict(max_new_tokens=8, temperature=1.0, seed=2)
    plain = sampling.generate(model, PROMPTS, **kw)
    proxied = sampling.generate(model, PROMPTS, proxy=(*proxy_models, 0.0), **kw)
    np.testing.assert_array_equal(np.asarray(proxied.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(proxied.logprobs), np.asarray(plain.logprobs), atol=1e-6)


def test_proxy_tuning_follows_combined_logits(qwen3, proxy_models):
    """Greedy proxy-tuned decoding equals the argmax of l + alpha * (l_expert - l_antiexpert)
    recomputed by teacher forcing through the three models."""
    _, model = qwen3
    alpha = 1.5
    out = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=0.0, proxy=(*proxy_models, alpha))
    base, expert, anti = (teacher_forced_logits(m, out) for m in (model, *proxy_models))
    combined = base + alpha * (expert - anti)
    mask = np.asarray(out.mask)
    np.testing.assert_array_equal(np.asarray(out.tokens)[mask], np.argmax(combined, -1)[mask])
    want = np.take_along_axis(np_log_softmax(combined), np.asarray(out.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], want[mask], atol=1e-4, rtol=0)


def test_repeated_calls_in_one_bucket_compile_once(qwen3):
    _, model = qwen3
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=4)
    sampling.generate(model, [[1, 2, 3], [4, 5]], **kw)
    sampling.generate(model, [[7] * 6, [8] * 8], seed=1, **kw)  # same buckets: batch 2, length 8
    sampler = next(s for key, s in sampling.sampler._SAMPLERS.items()
                   if key[0] != "refill" and key[1].top_k == 4)  # the static sampler's cache
    assert sampler._jitted[0]._cache_size() == 1 and sampler._jitted[1]._cache_size() == 1


def test_make_sampler_and_pure_sample_inside_jit_match_generate(qwen3):
    _, model = qwen3
    config = sampling.SamplingConfig(max_new_tokens=8, temperature=0.7, n=2)
    graphdef, state = nnx.split(model)
    width = sampling.bucket(max(map(len, PROMPTS)), sampling.sampler.PROMPT_BUCKET_MIN)  # as generate pads
    tokens, mask = sampling.left_pad(PROMPTS, width, len(PROMPTS), config.pad_id)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    want = sampling.generate(model, PROMPTS, max_new_tokens=8, temperature=0.7, n=2, seed=3)
    compiled = sampling.make_sampler(graphdef, config)(state, tokens, mask, jax.random.key(3))
    inside = jax.jit(lambda s, t, m, k: sampling.sample(graphdef, s, t, m, k, config))(state, tokens, mask,
                                                                                       jax.random.key(3))
    for got in (compiled, inside):
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-6)


def test_bucket_sizes():
    assert [sampling.bucket(x) for x in (1, 2, 3, 5, 8, 9, 17, 33, 100)] == [1, 2, 3, 5, 8, 10, 20, 40, 112]
    assert [sampling.bucket(x, 16) for x in (1, 16, 17, 33, 70)] == [16, 16, 20, 40, 80]


def test_bad_arguments_fail_clearly(qwen3):
    _, model = qwen3
    with pytest.raises(ValueError, match="at least one token"):
        sampling.generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(model, [[1]], max_new_tokens=2, top_p=0.0)
