"""evaluate's KL to a reference model against a NumPy float64 computation from materialized logits.

The reported "kl_to_reference" is the mean over sampled completions y of
sum_t KL(pi_T(.|x,y<t) || pi_ref,T(.|x,y<t)) (full vocabulary, both models at the sampling
temperature T, 1 for greedy, before top-k/top-p), and "kl_to_reference_per_token" the same
total over the number of completion tokens. The old metric, sum_t log pi(y_t) - log pi_ref(y_t)
at T = 1 over tokens sampled at T = 0.7 / top-p 0.8 / top-k 20, is shown to go negative on the
sampled case, where the new one is positive and matches NumPy.
"""

import string

import numpy as np
import pytest
from flax import nnx

from bridge import models, sampling
from bridge.evaluation import report, runner
from bridge.kernels.logprobs import api as logprobs_api
from bridge.tasks import get_task
from stage_helpers import tiny_decoder

ALPHABET = string.printable


def _decoder(tokenizer, seed, logit_scale):
    model = tiny_decoder(tokenizer, seed)
    return _scaled(model, logit_scale)


def _scaled(model, factor):
    """A copy whose logits are `factor` times the model's (the final norm's scale only feeds the
    tied output head), so the default 0.02 init is far from uniform."""
    model = nnx.clone(model)
    model.norm.scale[...] = model.norm.scale[...] * factor
    return model


@pytest.fixture(scope="module")
def setup():
    tokenizer = models.char_tokenizer(ALPHABET)
    model = _decoder(tokenizer, seed=0, logit_scale=5.0)
    return dict(
        tokenizer=tokenizer,
        task=get_task("arithmetic", digits=2, num_train=8, num_test=6),
        model=model,
        sharper=_scaled(model, 2.0),  # pi_ref = softmax(2 z): likes pi's likely tokens more than pi
        other=_decoder(tokenizer, seed=1, logit_scale=5.0),
    )


def _log_softmax64(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _completion_logits(model, out):
    """Materialized float64 logits [R, N, V] predicting each completion token."""
    prompt_tokens, prompt_mask = np.asarray(out.prompt_tokens), np.asarray(out.prompt_mask)
    tokens = np.asarray(out.tokens)
    seq = np.concatenate([prompt_tokens, tokens], axis=1)
    att = np.concatenate([prompt_mask, np.ones(tokens.shape, bool)], axis=1)
    logits = np.asarray(model(seq, attention_mask=att), np.float64)
    p = prompt_tokens.shape[1]
    return logits[:, p - 1 : p - 1 + tokens.shape[1]]


def _numpy_kl(model, reference, outs, temperature):
    """(per-completion KL sums, completion token counts, old-formula per-completion values)."""
    t = temperature if temperature > 0 else 1.0
    kls, counts, old = [], [], []
    for out in outs:
        mask = np.asarray(out.mask)
        tokens = np.asarray(out.tokens)
        lm, lr = _completion_logits(model, out), _completion_logits(reference, out)
        logp, logq = _log_softmax64(lm, t), _log_softmax64(lr, t)
        per_token = (np.exp(logp) * (logp - logq)).sum(-1)
        kls.append(np.where(mask, per_token, 0.0).sum(-1))
        counts.append(mask.sum(-1))
        # the previous metric: log-ratio of the sampled tokens under the raw (T = 1) models
        raw_p, raw_q = _log_softmax64(lm, 1.0), _log_softmax64(lr, 1.0)
        gather = lambda a: np.take_along_axis(a, tokens[..., None], -1)[..., 0]  # noqa: E731
        old.append(np.where(mask, gather(raw_p) - gather(raw_q), 0.0).sum(-1))
    return np.concatenate(kls), np.concatenate(counts), np.concatenate(old)


def _evaluate_capturing(monkeypatch, model, reference, setup, **kwargs):
    outs = []
    generate = sampling.generate

    def spy(*args, **kw):
        out = generate(*args, **kw)
        outs.append(out)
        return out

    monkeypatch.setattr(sampling, "generate", spy)
    results = runner.evaluate(model, setup["tokenizer"], setup["task"], reference_model=reference,
                              progress=False, **kwargs)
    return results, outs


SAMPLED = dict(n=3, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=6, limit=4, batch_size=2)
GREEDY = dict(n=2, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=5, limit=3)


@pytest.mark.parametrize(
    "reference_name, kwargs, implementation",
    [
        ("sharper", SAMPLED, None),  # T = 0.7, top-p 0.8, top-k 20: old metric < 0
        ("other", GREEDY, None),  # greedy: both models at T = 1
        ("other", dict(SAMPLED, temperature=1.3, top_k=0, top_p=1.0), "chunked"),  # streaming kernel
    ],
    ids=["sampled_sharper_reference", "greedy_other_model", "chunked_kernel_T1.3"],
)
def test_kl_to_reference_is_the_full_vocabulary_kl_along_the_completions(
    setup, monkeypatch, reference_name, kwargs, implementation
):
    model, reference = setup["model"], setup[reference_name]
    if implementation == "chunked":  # force the streaming kernel, in a fresh trace
        monkeypatch.setattr(logprobs_api, "REFERENCE_MAX_LOGITS_BYTES", 0)
        runner.kl_scorer.cache_clear()
    try:
        results, outs = _evaluate_capturing(monkeypatch, model, reference, setup, **kwargs)
    finally:
        if implementation == "chunked":
            runner.kl_scorer.cache_clear()
    kls, counts, old = _numpy_kl(model, reference, outs, kwargs["temperature"])
    m = results["metrics"]
    assert len(kls) == len(results["samples"]) == kwargs["limit"] * kwargs["n"]
    np.testing.assert_array_equal(counts, [s["length"] for s in results["samples"]])
    assert m["kl_to_reference"] == pytest.approx(kls.mean(), abs=1e-4)
    assert m["kl_to_reference_per_token"] == pytest.approx(kls.sum() / counts.sum(), abs=1e-4)
    assert m["kl_to_reference"] > 1e-3 and m["kl_to_reference_per_token"] > 1e-4
    assert (kls >= 0).all()
    # the per-token KL is at the evaluation's temperature: at another one it would differ
    other_t = 2.0 if kwargs["temperature"] != 2.0 else 1.0
    assert abs(_numpy_kl(model, reference, outs, other_t)[0].mean() - kls.mean()) > 1e-3
    if reference_name == "sharper":
        assert len({s["completion"] for s in results["samples"]}) > 1  # really sampled
        assert old.mean() < -0.1  # the previous "kl_to_reference" went negative here
        assert (old < 0).all() and (kls > 0).all()


def test_kl_of_a_model_to_itself_is_zero(setup, monkeypatch):
    results, _ = _evaluate_capturing(monkeypatch, setup["model"], nnx.clone(setup["model"]), setup, **SAMPLED)
    m = results["metrics"]
    assert m["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_to_reference_per_token"] == pytest.approx(0.0, abs=1e-6)


def test_kl_temperature_is_the_sampling_temperature_or_one_for_greedy():
    assert sampling.processors.scoring_temperature(0.7) == 0.7 and sampling.processors.scoring_temperature(1.3) == 1.3
    assert sampling.processors.scoring_temperature(0.0) == 1.0


def test_summary_reports_sequence_and_per_token_kl():
    correct = np.array([[1.0, 0.0], [0.0, 1.0]])
    lengths = np.array([[2, 4], [6, 8]])
    kls = np.array([[0.5, 1.0], [1.5, 3.0]])
    metrics = runner.summarize(correct, [["1", "2"], ["3", "4"]], lengths=lengths, kls=kls)
    assert metrics["kl_to_reference"] == pytest.approx(1.5)
    assert metrics["kl_to_reference_per_token"] == pytest.approx(6.0 / 20.0)
    without = runner.summarize(correct, [["1", "2"], ["3", "4"]], lengths=lengths)
    assert "kl_to_reference" not in without and "kl_to_reference_per_token" not in without
    results = {"task": "t", "split": "test", "num_problems": 2, "n": 2, "ks": [1, 2], "seed": 0,
               "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8},
               "metrics": metrics}
    markdown = report.results_markdown(results)
    assert "| kl_to_reference | 1.5000 |" in markdown
    assert "| kl_to_reference_per_token | 0.3000 |" in markdown
    assert "Rao-Blackwellized reverse KL" in markdown and "temperature 1.0" in markdown
    assert "Rao-Blackwellized" not in report.results_markdown({**results, "metrics": without})
