"""launch.eval end to end (toy task from a config, GSM8K and MATH fixtures), the runner's
metrics against the samples it wrote, and launch.table over the result folders."""

import json
import os
import string
import subprocess
import sys

import numpy as np
import pytest

from bridge import models
from bridge.evaluation import runner
from bridge.tasks import get_task
from stage_helpers import tiny_decoder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CONFIG = """
import ml_collections
def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.tokenizer = "char:" + {alphabet!r}
  c.task = ml_collections.ConfigDict(dict(name="arithmetic", options=dict(digits=2, num_train=8, num_test=6)))
  c.eval = ml_collections.ConfigDict(dict(num_prompts=5, batch_size=3, max_new_tokens=5{sampling}))
  return c
"""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = models.char_tokenizer(string.printable)
    dirs = []
    for seed in (0, 1):
        path = str(root / f"model{seed}")
        models.save_hf(tiny_decoder(tokenizer, seed), path, tokenizer=tokenizer)
        dirs.append(path)
    return dirs


def _cli(module, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_outputs(outdir, task, num_problems, n):
    results = json.load(open(os.path.join(outdir, "results.json")))
    samples = [json.loads(line) for line in open(os.path.join(outdir, "samples.jsonl"))]
    assert results["num_problems"] == num_problems and results["n"] == n
    assert len(samples) == num_problems * n
    by_id = {x.id: x for x in task.examples("test")}
    scores = np.zeros((num_problems, n))
    for index, sample in enumerate(samples):
        example = by_id[sample["id"]]
        again = task.reward(sample["completion"], example, truncated=sample["truncated"])
        assert again.score == sample["score"] and again.extracted_answer == sample["extracted_answer"]
        scores[index // n, sample["sample"]] = sample["score"]
    m = results["metrics"]
    assert m[f"avg@{n}"] == pytest.approx(scores.mean())
    passes = [m[f"pass@{k}"] for k in results["ks"]]
    assert passes == sorted(passes) and passes[0] == pytest.approx(scores.mean())
    assert 0 < m["mean_response_length"] <= results["sampling"]["max_new_tokens"]
    assert m["mean_response_length"] == pytest.approx(np.mean([s["length"] for s in samples]))
    assert np.isfinite(m["mean_token_entropy"]) and m["mean_token_entropy"] > 0
    for name in ("results.md", "passk.png"):
        assert os.path.getsize(os.path.join(outdir, name)) > 100
    return results


def test_eval_toy_task_from_config(model_dirs, tmp_path):
    config = tmp_path / "eval_config.py"
    config.write_text(CONFIG.format(alphabet=string.printable, sampling=""))
    outdir = str(tmp_path / "toy")
    proc = _cli(
        "launch.eval",
        f"--config={config}",
        f"--checkpoint={model_dirs[0]}",
        f"--reference={model_dirs[0]}",
        f"--outdir={outdir}",
        "--n=4",
        "--temperature=1.0",
        "--method=toy_model",
    )
    task = get_task("arithmetic", digits=2, num_train=8, num_test=6)
    results = _check_outputs(outdir, task, num_problems=5, n=4)
    assert results["seed"] == 3 and results["sampling"]["max_new_tokens"] == 5
    assert results["method"] == "toy_model"
    assert abs(results["metrics"]["kl_to_reference"]) < 1e-4  # model vs itself
    assert "pass@k" in proc.stdout or "| k |" in proc.stdout


def test_eval_sampling_comes_from_the_config_unless_a_flag_is_given(model_dirs, tmp_path):
    config = tmp_path / "eval_config.py"
    config.write_text(CONFIG.format(alphabet=string.printable,
                                    sampling=", n=3, temperature=0.9, top_p=0.95, top_k=7"))
    _cli("launch.eval", f"--config={config}", f"--checkpoint={model_dirs[0]}", f"--outdir={tmp_path / 'a'}",
         "--top_k=5", "--limit=2", "--progress=false")
    results = json.load(open(tmp_path / "a" / "results.json"))
    assert results["n"] == 3
    assert (results["sampling"]["temperature"], results["sampling"]["top_p"], results["sampling"]["top_k"]) == (
        0.9, 0.95, 5)


def test_eval_gsm8k_and_math_fixtures_then_table(model_dirs, tmp_path):
    outdirs = []
    for name, fixture in (("gsm8k", "gsm8k_test.jsonl"), ("math", "math_test.jsonl")):
        options = {"test_path": os.path.join(FIXTURES, fixture), "chat": False}
        outdir = str(tmp_path / name)
        _cli(
            "launch.eval",
            f"--hf_dir={model_dirs[0]}",
            f"--reference={model_dirs[1]}",
            f"--task={name}",
            f"--task_options={json.dumps(options)}",
            f"--outdir={outdir}",
            "--n=2",
            "--max_new_tokens=8",
            "--noprogress",
        )
        results = _check_outputs(outdir, get_task(name, **options), num_problems=3, n=2)
        assert results["metrics"]["kl_to_reference"] != 0.0
        outdirs.append(outdir)
    _cli(
        "launch.table",
        *outdirs,
        "--metric=pass",
        f"--out={tmp_path / 't.md'}",
        f"--kl_plot={tmp_path / 'kl.png'}",
    )
    assert "| method | gsm8k | math |" in open(tmp_path / "t.md").read()
    assert os.path.getsize(tmp_path / "kl.png") > 1000


def test_runner_greedy_is_deterministic_and_kl_to_self_is_zero(model_dirs):
    model = models.load_hf(model_dirs[0])
    tokenizer = models.load_tokenizer(model_dirs[0])
    task = get_task("arithmetic", digits=2, num_train=8, num_test=6)
    kwargs = dict(n=2, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=4, limit=3, progress=False)
    first = runner.evaluate(model, tokenizer, task, reference_model=model, **kwargs)
    second = runner.evaluate(model, tokenizer, task, **kwargs)
    texts = [s["completion"] for s in first["samples"]]
    assert texts == [s["completion"] for s in second["samples"]]
    assert texts[0::2] == texts[1::2]  # greedy: both samples of a prompt agree
    assert first["metrics"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert "kl_to_reference" not in second["metrics"]
    assert first["metrics"]["truncated_rate"] == np.mean([s["truncated"] for s in first["samples"]])
