"""Evaluation reports: metric summary against brute force, files written, multi-run table."""

import itertools
import json
import os

import numpy as np
import pytest

from bridge.evaluation import report
from bridge.evaluation.runner import powers_of_two, summarize


def _brute_pass_at_k(row, k):
    subsets = list(itertools.combinations(range(len(row)), k))
    return np.mean([max(row[i] for i in s) for s in subsets])


def _results(correct, answers, task="arithmetic", method="m", seed=0, kl=None):
    correct = np.asarray(correct, float)
    lengths = np.full(correct.shape, 5.0)
    metrics = summarize(
        correct,
        answers,
        lengths=lengths,
        entropies=np.full(correct.shape, 0.5),
        kls=None if kl is None else np.full(correct.shape, kl),
        format_ok=np.ones(correct.shape, bool),
        truncated=np.zeros(correct.shape, bool),
    )
    n = correct.shape[1]
    return {
        "task": task,
        "split": "test",
        "num_problems": correct.shape[0],
        "n": n,
        "ks": powers_of_two(n),
        "seed": seed,
        "method": method,
        "sampling": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 8},
        "metrics": metrics,
        "samples": [
            {"id": f"test/{p}", "sample": j, "score": float(correct[p, j])}
            for p in range(correct.shape[0])
            for j in range(n)
        ],
    }


def test_powers_of_two():
    assert powers_of_two(1) == [1] and powers_of_two(16) == [1, 2, 4, 8, 16]
    assert powers_of_two(6) == [1, 2, 4, 6]


def test_summarize_matches_brute_force():
    rng = np.random.default_rng(0)
    correct = (rng.random((7, 6)) < 0.4).astype(float)
    answers = [[("a" if c else str(rng.integers(3))) for c in row] for row in correct]
    metrics = summarize(correct, answers, lengths=np.arange(42.0).reshape(7, 6))
    for k in (1, 2, 4, 6):
        assert metrics[f"pass@{k}"] == pytest.approx(np.mean([_brute_pass_at_k(r, k) for r in correct]))
        assert metrics[f"avg@{k}"] == pytest.approx(correct[:, :k].mean())
    # majority by hand for k = 6
    majority = []
    for row_answers, row in zip(answers, correct):
        counts = {}
        for a in row_answers:
            counts[a] = counts.get(a, 0) + 1
        best = max(counts.values())
        winner = next(a for a in row_answers if counts[a] == best)
        majority.append(float(row[row_answers.index(winner)]))
    assert metrics["maj@6"] == pytest.approx(np.mean(majority))
    assert metrics["mean_response_length"] == pytest.approx(20.5)


def test_write_results_files(tmp_path):
    results = _results([[1, 0, 1, 1], [0, 0, 0, 1]], [["1", "2", "1", "1"], ["3", "3", None, "4"]])
    paths = report.write_results(results, str(tmp_path / "out"))
    saved = json.loads(open(paths["results.json"]).read())
    assert "samples" not in saved and saved["metrics"]["pass@1"] == pytest.approx(0.5)
    assert saved["metrics"]["pass@4"] == 1.0 and saved["metrics"]["maj@4"] == pytest.approx(0.5)
    lines = open(paths["samples.jsonl"]).read().splitlines()
    assert len(lines) == 8 and json.loads(lines[3])["score"] == 1.0
    markdown = open(paths["results.md"]).read()
    assert "| 4 | 0.5000 | 1.0000 | 0.5000 |" in markdown and "mean_token_entropy" in markdown
    assert open(paths["passk.png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_gather_table_mean_std_over_seeds(tmp_path):
    values = {("grpo", "gsm8k"): [0.5, 0.625], ("grpo", "math"): [0.25], ("opd", "gsm8k"): [0.75, 1.0]}
    dirs = []
    for (method, task), accs in values.items():
        for seed, acc in enumerate(accs):
            correct = np.zeros((4, 2))
            correct.flat[: int(round(acc * 8))] = 1  # acc exactly representable in 8 cells
            d = tmp_path / f"{method}_{task}_{seed}"
            report.write_results(
                _results(correct, [["x", "y"]] * 4, task, method, seed, kl=0.1 * seed), str(d)
            )
            dirs.append(str(d))
    table = report.gather_table(dirs, "avg")
    grpo = f"{np.mean([50, 62.5]):.1f} ± {np.std([50, 62.5], ddof=1):.1f} (n=2)"
    opd = f"{np.mean([75, 100]):.1f} ± {np.std([75, 100], ddof=1):.1f} (n=2)"
    assert "| method | gsm8k | math |" in table
    assert f"| grpo | {grpo} | 25.0 |" in table and f"| opd | {opd} | - |" in table
    assert "0.050" in report.gather_table(dirs, "kl_to_reference")
    with pytest.raises(ValueError, match="no metric 'pass@64'"):
        report.gather_table(dirs, "pass@64")
    with pytest.raises(FileNotFoundError, match="No results.json"):
        report.gather_table([str(tmp_path)], "avg")
    report.plot_accuracy_vs_kl([("a", 0.1, 0.5), ("b", 0.3, 0.7)], str(tmp_path / "kl.png"))
    assert os.path.getsize(tmp_path / "kl.png") > 1000
