"""Sampling-based evaluation of a model on a task: n completions per problem, verifier scores,
avg@k / unbiased pass@k / maj@k, response length, token entropy and KL to a reference model.

Per completion y of prompt x (sampled with the given temperature / top-p / top-k):
  length        number of generated tokens (eos included)
  entropy       mean over y's positions of H(pi(. | x, y_<t)) under the raw model (T = 1)
  kl            sum_t KL(pi_T(. | x, y_<t) || pi_ref,T(. | x, y_<t)), each term exact over the full
                vocabulary, where pi_T = softmax(logits / T) at the evaluation's sampling
                temperature T (T = 1 for greedy, temperature 0), before top-k / top-p truncation.
                This is the Rao-Blackwellized form of the Monte-Carlo reverse-KL estimate
                sum_t log pi_T(y_t | ...) - log pi_ref,T(y_t | ...): the same expectation over
                y ~ pi_T, lower variance, and >= 0 for every completion. Its mean over completions
                estimates the sequence-level reverse KL(pi_T || pi_ref,T) (new policy to the
                reference, over samples from the new policy); with top-k / top-p < 1 the
                completions come from the truncated sampler, so the prefixes are those of the
                truncated policy while each term stays the untruncated per-position KL.
Metrics "kl_to_reference" (mean over completions of the per-completion sum: sequence KL, nats)
and "kl_to_reference_per_token" (total over all completion tokens / number of completion tokens).
maj@k votes over answers canonicalized by `bridge.tasks.math.normalize_answer`.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from bridge import distributed, sampling, scoring, sharding
from bridge.evaluation.metrics import avg_at_k, maj_at_k, pass_at_k
from bridge.models.tokenizer import eos_ids as tokenizer_eos_ids, pad_id as tokenizer_pad_id
from bridge.tasks.math import normalize_answer


def powers_of_two(n: int) -> list[int]:
    """k in {1, 2, 4, ..., n} (n itself included when it is not a power of two)."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks + ([n] if ks[-1] != n else [])


def summarize(
    correct: np.ndarray,
    answers: list[list],
    *,
    lengths: np.ndarray,
    entropies: np.ndarray | None = None,
    kls: np.ndarray | None = None,
    format_ok: np.ndarray | None = None,
    truncated: np.ndarray | None = None,
) -> dict:
    """Flat metrics from per-completion arrays shaped [problems, n].

    kls (optional) holds each completion's summed per-token KL to the reference; it gives
    "kl_to_reference" (their mean) and "kl_to_reference_per_token" (their total over the total
    of `lengths`, the completion token counts).
    """
    correct = np.asarray(correct, np.float64)
    problems, n = correct.shape
    metrics = {}
    for k in powers_of_two(n):
        metrics[f"avg@{k}"] = float(np.mean(avg_at_k(correct[:, :k])))
        metrics[f"pass@{k}"] = float(np.mean(pass_at_k(n, (correct > 0.5).sum(-1), k)))
        metrics[f"maj@{k}"] = float(np.mean(maj_at_k(answers, correct, k)))
    metrics["mean_response_length"] = float(np.mean(lengths))
    if entropies is not None:
        metrics["mean_token_entropy"] = float(np.mean(entropies))
    if kls is not None:  # kls: per-completion sums of the per-token KL (see the module docstring)
        kls = np.asarray(kls, np.float64)
        metrics["kl_to_reference"] = float(np.mean(kls))
        metrics["kl_to_reference_per_token"] = float(kls.sum() / max(float(np.sum(lengths)), 1.0))
    if format_ok is not None:
        metrics["format_rate"] = float(np.mean(format_ok))
    if truncated is not None:
        metrics["truncated_rate"] = float(np.mean(truncated))
    return metrics


def batch_shards(mesh, rules) -> int:
    """How many ways `mesh` splits a batch's rows: the product of the mesh axes the "batch"
    rule names (1 without a mesh)."""
    if mesh is None:
        return 1
    spec = sharding.logical_to_spec(("batch",), rules or sharding.DEFAULT_RULES, None, mesh)[0]
    return math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec or ()))


def scoring_rows(rows: int, mesh, rules) -> int:
    """`rows` rounded up to a multiple of the batch shards: the rows a scoring pass runs."""
    shards = batch_shards(mesh, rules)
    return -(-rows // shards) * shards


@functools.lru_cache(maxsize=16)
def _padder(rows: int, placement):
    return jax.jit(lambda *xs: tuple(jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1), mode="edge")
                                     for x in xs), out_shardings=placement)


def scoring_batch(out, mesh=None, rules=None) -> tuple:
    """(prompt_tokens, prompt_mask, tokens, mask) of `out`'s completions. With a mesh, the rows
    are padded (the last one repeated) to `scoring_rows` and split over the batch shards, so
    each device scores its share (rows that do not divide would be replicated: every device
    scoring all of them); the rows past out's are to be ignored."""
    arrays = (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
    if mesh is None:
        return arrays
    rows = scoring_rows(out.tokens.shape[0], mesh, rules)
    return _padder(rows, sharding.batch_sharding(mesh, 2, rules or sharding.DEFAULT_RULES, (rows, 1)))(*arrays)


@functools.lru_cache(maxsize=8)
def entropy_scorer(graphdef):
    """Jitted (state, prompt_tokens, prompt_mask, tokens, mask) -> (logprobs, entropies) [R, N]
    of the completions (0 off the mask); `bridge.abstract.eval_programs` compiles it too."""

    @jax.jit
    def score(state, prompt_tokens, prompt_mask, tokens, mask):
        model = nnx.merge(graphdef, state)
        batch = dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens)
        logp, entropy = scoring.completion_logprobs(model, batch, return_entropy=True)
        return jnp.where(mask, logp, 0.0), jnp.where(mask, entropy, 0.0)

    return score


def completion_scores(model, batch: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(per-token logprobs, entropies) float32[R, N] under `model` of the completions of a
    `scoring_batch`."""
    graphdef, state = nnx.split(model)
    return distributed.to_host(entropy_scorer(graphdef)(state, *batch))


@functools.lru_cache(maxsize=8)
def kl_scorer(graphdef, reference_graphdef, temperature: float):
    """Jitted (state, reference_state, prompt_tokens, prompt_mask, tokens, mask) -> per-token
    KL [R, N] (`completion_kl`)."""

    @jax.jit
    def kl(state, reference_state, prompt_tokens, prompt_mask, tokens, mask):
        model = nnx.merge(graphdef, state)
        reference = nnx.merge(reference_graphdef, reference_state)
        batch = dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens, mask=mask)
        per_token = scoring.completion_divergence(model, reference, batch, "reverse_kl", temperature=temperature)
        return jnp.where(mask, per_token, 0.0)

    return kl


def completion_kl(model, reference_model, batch: tuple, temperature: float) -> np.ndarray:
    """float32[R, N]: KL(pi_T(. | x, y_<t) || pi_ref,T(. | x, y_<t)) at each position of the
    completions of a `scoring_batch` (0 off the mask), exact over the full vocabulary and streamed by
    `bridge.scoring.completion_divergence` (kind "reverse_kl", student = model, teacher =
    reference), never holding [R, N, V] logits for large vocabularies. pi_T = softmax(logits / T)
    with T = `sampling.processors.scoring_temperature(temperature)`. Both models must share the vocabulary."""
    graphdef, state = nnx.split(model)
    reference_graphdef, reference_state = nnx.split(reference_model)
    kl = kl_scorer(graphdef, reference_graphdef, sampling.processors.scoring_temperature(temperature))(
        state, reference_state, *batch
    )
    return distributed.to_host(kl)


def on_mesh(model, mesh, rules):
    """`model` with its parameters placed by their logical axes on `mesh` (no copy for a model
    already placed so, e.g. loaded with `load_hf(..., mesh=, rules=)`); unchanged without a mesh."""
    if mesh is None or model is None:
        return model
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, sharding.shard_state(state, mesh, rules or sharding.DEFAULT_RULES))


def evaluate(
    model,
    tokenizer,
    task,
    *,
    n: int = 16,
    temperature: float = 0.7,
    top_p: float = 0.8,
    top_k: int = 20,
    max_new_tokens: int | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    reference_model=None,
    batch_size: int = 64,
    eos_ids=None,
    mesh=None,
    rules=None,
    progress: bool = True,
    proxy=None,
) -> dict:
    """Samples n completions per problem of `task.examples(split)[:limit]` and scores them.

    Returns the results dict described in `bridge.evaluation.report` (metrics, per-completion
    samples). `batch_size` prompts go to one `sampling.generate` call (batch_size * n rows);
    max_new_tokens defaults to task.max_answer_tokens; eos_ids default to the tokenizer's.
    proxy=(expert, antiexpert, alpha) decodes proxy-tuned (`sampling.generate`); the entropy
    and the KL to the reference are then still those of `model` along the proxy's samples.
    With a `mesh` (and logical-axis `rules`), every program runs on it: the models placed by
    their axes (`on_mesh`), the sampler's and the scoring passes' rows over its batch axes.
    `bridge.abstract.eval_programs` compiles one batch's programs without running them.
    """
    examples = list(task.examples(split))[:limit]
    if not examples:
        raise ValueError(f"evaluate: task {task.name!r} split {split!r} has no examples.")
    max_new_tokens = int(max_new_tokens or task.max_answer_tokens)
    eos = tuple(eos_ids) if eos_ids is not None else tokenizer_eos_ids(tokenizer)
    pad = tokenizer_pad_id(tokenizer)
    model, reference_model = on_mesh(model, mesh, rules), on_mesh(reference_model, mesh, rules)
    scope = (lambda: contextlib.nullcontext()) if mesh is None else (lambda: sharding.use_mesh(mesh, rules))  # noqa: E731
    correct, answers, lengths, entropies, kls, format_ok, truncated, samples = ([] for _ in range(8))
    bar = tqdm(total=len(examples), desc=f"eval {task.name}", unit="prompt", disable=not progress)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [task.prompt_ids(example, tokenizer) for example in chunk]
        out = sampling.generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_ids=eos,
            pad_id=pad,
            n=n,
            seed=seed + start,
            mesh=mesh,
            rules=rules,
            proxy=proxy,
        )
        with scope():  # under the mesh: the scoring passes split rows over its batch axes
            batch = scoring_batch(out, mesh, rules)
            _, entropy = completion_scores(model, batch)
            kl = completion_kl(model, reference_model, batch, temperature) if reference_model is not None else None
        tokens, mask, finish = distributed.to_host((out.tokens, out.mask, out.finish_reason))  # all hosts
        for b, example in enumerate(chunk):
            row_correct, row_answers = [], []
            for j in range(n):
                r = b * n + j
                ids = [int(t) for t, m in zip(tokens[r], mask[r]) if m and int(t) not in eos]
                text = tokenizer.decode(ids, skip_special_tokens=True)
                cut = bool(finish[r] == sampling.FINISH_LENGTH)
                result = task.reward(text, example, truncated=cut)
                length = int(mask[r].sum())
                row_correct.append(result.score)
                row_answers.append(
                    None if result.extracted_answer is None else normalize_answer(result.extracted_answer)
                )
                lengths.append(length)
                entropies.append(float(entropy[r].sum() / max(length, 1)))
                if kl is not None:
                    kls.append(float(kl[r].sum(dtype=np.float64)))
                format_ok.append(result.format_ok)
                truncated.append(cut)
                samples.append(
                    {
                        "id": example.id,
                        "sample": j,
                        "prompt": task.prompt_text(example) if not task.chat else task.messages(example),
                        "completion": text,
                        "extracted_answer": result.extracted_answer,
                        "answer": example.answer,
                        "score": result.score,
                        "format_ok": result.format_ok,
                        "truncated": cut,
                        "length": length,
                    }
                )
            correct.append(row_correct)
            answers.append(row_answers)
        bar.update(len(chunk))
    bar.close()
    metrics = summarize(
        np.asarray(correct),
        answers,
        lengths=np.asarray(lengths),
        entropies=np.asarray(entropies),
        kls=np.asarray(kls) if kls else None,
        format_ok=np.asarray(format_ok),
        truncated=np.asarray(truncated),
    )
    return {
        "task": task.name,
        "split": split,
        "num_problems": len(examples),
        "n": n,
        "ks": powers_of_two(n),
        "seed": seed,
        "sampling": {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "max_new_tokens": max_new_tokens,
        },
        "metrics": metrics,
        "samples": samples,
    }
