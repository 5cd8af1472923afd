"""Sampling-based accuracy metrics over n samples per problem (host-side NumPy).

    pass_at_k  unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models
               Trained on Code"): 1 - C(n - c, k) / C(n, k) per problem
    avg_at_k   mean accuracy over the k samples of each problem (avg@k, "mean@k")
    maj_at_k   accuracy of the majority-vote answer among k samples (self-consistency,
               Wang et al. 2023)

All return one value per problem; average them for a table entry.
"""
import collections

import numpy as np


def pass_at_k(n, c, k):
    """Unbiased pass@k per problem from n samples with c correct.

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i),
    and 1.0 when n - c < k (every k-subset holds a correct sample). n, c, k broadcast
    (arrays over problems or scalars); requires 0 <= c <= n and 1 <= k <= n. The product
    form never forms large binomials, so it is exact to float64 rounding for any n.
    """
    n, c, k = np.broadcast_arrays(*(np.asarray(x, np.int64) for x in (n, c, k)))
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("pass_at_k needs 0 <= c <= n for every problem.")
    if np.any(k < 1) or np.any(k > n):
        raise ValueError("pass_at_k needs 1 <= k <= n (the estimator is undefined for k > n).")
    i = np.arange(1, int(n.max(initial=1)) + 1)
    in_product = (i >= (n - c + 1)[..., None]) & (i <= n[..., None])
    factors = np.where(in_product, 1.0 - k[..., None] / i, 1.0)
    return np.where(n - c < k, 1.0, 1.0 - np.prod(factors, axis=-1))


def avg_at_k(correct):
    """Mean accuracy over samples: correct bool/float[..., k] -> float[...]."""
    return np.mean(np.asarray(correct, np.float64), axis=-1)


def maj_at_k(answers, correct, k=None):
    """Majority-vote accuracy per problem.

    answers: per problem, a sequence of extracted answers (hashable; None = no answer,
      which does not vote). correct: matching per-sample 0/1 verdicts from the verifier.
    k: vote over the first k samples (default: all). The most frequent answer wins; ties
    go to the answer seen first. A problem scores the verdict of its winning answer, 0
    when no sample gave an answer. Answers vote by equality, so canonicalize them first
    (e.g. with the task's answer normalizer) when equivalent forms may differ.
    Returns float[P].
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k got {len(answers)} answer lists for {len(correct)} verdict lists.")
    scores = []
    for problem_answers, problem_correct in zip(answers, correct):
        if len(problem_answers) != len(problem_correct):
            raise ValueError("maj_at_k needs one verdict per answer.")
        votes = collections.Counter()
        verdict = {}
        for answer, ok in list(zip(problem_answers, problem_correct))[:k]:
            if answer is None:
                continue
            votes[answer] += 1
            verdict.setdefault(answer, float(ok))
        winner = max(votes, key=votes.__getitem__, default=None)
        scores.append(0.0 if winner is None else verdict[winner])
    return np.asarray(scores, np.float64)
