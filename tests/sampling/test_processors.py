"""Logit processors against NumPy references; token draws follow the processed distribution."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bridge import models, sampling
from bridge.sampling import processors
from bridge.sampling.sampler import SamplingConfig, _select, greedy


def np_top_k(z, k):
    kth = np.sort(z, axis=-1)[:, -k][:, None]
    return np.where(z >= kth, z, -np.inf)


def np_top_p(z, p):
    out = np.full_like(z, -np.inf)
    for r in range(z.shape[0]):
        order = np.argsort(-z[r], kind="stable")
        probs = np.exp(z[r, order] - z[r].max())
        probs /= probs.sum()
        before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        kept = order[before < p]
        out[r, kept] = z[r, kept]
        out[r] = np.where(z[r] >= z[r, kept].min(), z[r], -np.inf)  # ties with the last kept value
    return out


def np_min_p(z, m):
    probs = np.exp(z - z.max(-1, keepdims=True))
    return np.where(probs >= m * probs.max(-1, keepdims=True), z, -np.inf)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0.0, 2.0, (4, 37)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 36])
def test_top_k(logits, k):
    np.testing.assert_array_equal(np.asarray(processors.top_k_filter(jnp.asarray(logits), k)), np_top_k(logits, k))


def test_top_k_off_is_identity(logits):
    np.testing.assert_array_equal(np.asarray(processors.top_k_filter(jnp.asarray(logits), 0)), logits)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p(logits, p):
    np.testing.assert_array_equal(np.asarray(processors.top_p_filter(jnp.asarray(logits), p)), np_top_p(logits, p))


def test_top_p_after_top_k_sorts_only_candidates(logits):
    z = np_top_k(logits, 5)
    got = processors.top_p_filter(jnp.asarray(z), 0.7, candidates=5)
    np.testing.assert_array_equal(np.asarray(got), np_top_p(z, 0.7))


@pytest.mark.parametrize("m", [0.01, 0.3])
def test_min_p(logits, m):
    np.testing.assert_array_equal(np.asarray(processors.min_p_filter(jnp.asarray(logits), m)), np_min_p(logits, m))


def test_process_chain_order(logits):
    got = processors.process(jnp.asarray(logits), temperature=0.7, top_k=10, top_p=0.8, min_p=0.05)
    want = np_min_p(np_top_p(np_top_k(logits / np.float32(0.7), 10), 0.8), 0.05)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


PROXY_VOCAB, PROXY_TOKEN, PROXY_BOOST = 23, 17, 20.0
PROXY_PROMPTS = [[5, 6, 7], [1, 2, 3, 4], [9]]


def tiny_decoder(seed):
    cfg = models.ModelConfig(family="qwen3", vocab_size=PROXY_VOCAB, hidden_size=16, intermediate_size=32,
                             num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)
    return models.Decoder(cfg, rngs=nnx.Rngs(seed))


def last_prompt_logits(model, prompts):
    """float64[B, V]: each prompt run alone (no padding, no cache), logits at its last token."""
    return np.stack([np.asarray(model(jnp.asarray([p], jnp.int32)))[0, -1] for p in prompts]).astype(np.float64)


@pytest.fixture(scope="module")
def proxy_trio():
    """(base, expert, antiexpert): the expert is the antiexpert with its output-head column for
    PROXY_TOKEN shifted so that, at the last token of every PROXY_PROMPT, expert - antiexpert is
    exactly PROXY_BOOST at PROXY_TOKEN and 0 at every other token."""
    base, anti = tiny_decoder(0), tiny_decoder(1)
    expert = nnx.clone(anti)
    hidden = np.stack([np.asarray(anti.hidden_states(jnp.asarray([p], jnp.int32)))[0, -1] for p in PROXY_PROMPTS])
    delta = np.linalg.lstsq(hidden.astype(np.float64), np.full(len(PROXY_PROMPTS), PROXY_BOOST), rcond=None)[0]
    expert.lm_head[...] = expert.lm_head[...].at[:, PROXY_TOKEN].add(jnp.asarray(delta, jnp.float32))
    gap = last_prompt_logits(expert, PROXY_PROMPTS) - last_prompt_logits(anti, PROXY_PROMPTS)
    want_gap = np.zeros_like(gap)
    want_gap[:, PROXY_TOKEN] = PROXY_BOOST
    np.testing.assert_allclose(gap, want_gap, atol=1e-3)  # the construction itself
    return base, expert, anti


def test_proxy_tuning_steers_greedy_decoding_to_the_expert_token(proxy_trio):
    """Liu et al. 2024: decoding from base + alpha * (expert - antiexpert). With expert - antiexpert
    = +PROXY_BOOST on one token only, greedy decoding through `generate` picks that token first for
    alpha > 0, where the base alone picks something else; alpha = 0 decodes exactly as the base."""
    base, expert, anti = proxy_trio
    kw = dict(max_new_tokens=6, temperature=0.0)
    plain = sampling.generate(base, PROXY_PROMPTS, **kw)
    plain_first = np.asarray(plain.tokens)[:, 0]
    assert not np.any(plain_first == PROXY_TOKEN), plain_first  # precondition: the base prefers other tokens
    np.testing.assert_array_equal(plain_first, np.argmax(last_prompt_logits(base, PROXY_PROMPTS), -1))

    steered = sampling.generate(base, PROXY_PROMPTS, proxy=(expert, anti, 0.5), **kw)
    np.testing.assert_array_equal(np.asarray(steered.tokens)[:, 0], PROXY_TOKEN)

    unsteered = sampling.generate(base, PROXY_PROMPTS, proxy=(expert, anti, 0.0), **kw)
    np.testing.assert_array_equal(np.asarray(unsteered.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(unsteered.mask), np.asarray(plain.mask))
    np.testing.assert_allclose(np.asarray(unsteered.logprobs), np.asarray(plain.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.05, 0.7])
def test_proxy_first_step_logits_match_numpy(proxy_trio, alpha):
    """The sampler's first-step logits (its prefill, on the left-padded batch) equal
    l_base + alpha * (l_expert - l_antiexpert) from the three models run separately, in float64;
    greedy `generate` reports log_softmax of that combination at its first token."""
    base, expert, anti = proxy_trio
    l_base, l_expert, l_anti = (last_prompt_logits(m, PROXY_PROMPTS) for m in proxy_trio)
    want = l_base + alpha * (l_expert - l_anti)

    config = SamplingConfig(max_new_tokens=1, temperature=0.0, proxy_alpha=alpha)
    tokens, mask = sampling.left_pad(PROXY_PROMPTS, 16, len(PROXY_PROMPTS), 0)
    split = [nnx.split(m) for m in proxy_trio]
    _, got = sampling.prefill(tuple(g for g, _ in split), tuple(s for _, s in split),
                              jnp.asarray(tokens), jnp.asarray(mask), config)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-5)

    out = sampling.generate(base, PROXY_PROMPTS, max_new_tokens=1, temperature=0.0, proxy=(expert, anti, alpha))
    first = np.asarray(out.tokens)[:, 0]
    np.testing.assert_array_equal(first, np.argmax(want, -1))
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np_log_softmax(want)[np.arange(len(first)), first],
                               atol=1e-4, rtol=0)


def test_is_stop():
    tokens = jnp.array([[1, 2, 3], [4, 2, 9]])
    np.testing.assert_array_equal(np.asarray(processors.is_stop(tokens, (2, 9))), [[0, 1, 0], [0, 1, 1]])
    assert not np.asarray(processors.is_stop(tokens, ())).any()


@pytest.mark.parametrize("rows", [1, 4])
def test_greedy_matches_numpy_and_breaks_ties_low(logits, rows):
    z = logits[:rows].copy()
    z[-1, 7] = z[-1, 30] = z[-1].max() + 1.0  # a tie: the lower index wins, as np.argmax
    token, logprob = jax.jit(greedy)(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(token), np.argmax(z, -1))
    want = np_log_softmax(z)[np.arange(rows), np.argmax(z, -1)]
    np.testing.assert_allclose(np.asarray(logprob), want, rtol=1e-5)


@pytest.mark.parametrize("settings", [dict(temperature=1.3), dict(temperature=0.8, top_k=3),
                                      dict(temperature=1.0, top_p=0.6), dict(temperature=1.0, min_p=0.2)])
def test_draws_follow_processed_distribution(settings):
    """20k draws of one row: empirical frequencies match softmax(processed) within 4 sigma, and
    the reported logprob is log_softmax(z / T)[token], before truncation (what a trainer
    recomputes for the token)."""
    z = np.array([[1.0, 0.2, -0.5, 2.0, 0.0, -3.0]], np.float32)
    config = SamplingConfig(max_new_tokens=1, **settings)
    keys = jax.random.split(jax.random.key(0), 20000)
    row, step = jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)  # each key: row 0's draw at step 0
    tokens, logprobs = jax.jit(jax.vmap(lambda k: _select(jnp.asarray(z), k, row, step, config)))(keys)
    tokens, logprobs = np.asarray(tokens)[:, 0], np.asarray(logprobs)[:, 0]
    processed = z / np.float32(settings["temperature"])
    processed = np_top_k(processed, settings["top_k"]) if settings.get("top_k") else processed
    processed = np_top_p(processed, settings["top_p"]) if settings.get("top_p") else processed
    processed = np_min_p(processed, settings["min_p"]) if settings.get("min_p") else processed
    probs = np.exp(np_log_softmax(processed))[0]
    freq = np.bincount(tokens, minlength=z.shape[1]) / len(tokens)
    sigma = np.sqrt(probs * (1 - probs) / len(tokens))
    assert np.all(np.abs(freq - probs) <= 4 * sigma + 1e-12), (freq, probs)
    chex.assert_trees_all_close(logprobs, np_log_softmax(z / np.float32(settings["temperature"]))[0][tokens],
                                rtol=1e-5)
