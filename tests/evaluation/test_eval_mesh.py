"""Evaluation on the mesh and in the memory plan: sharded evaluation equals the 1-device one,
launch.fit reports the evaluation's programs, and the batch size chosen from a memory budget.
"""

import functools
import json
import os
import string
import subprocess
import sys

import jax
import numpy as np
import pytest

from bridge import abstract, models, sampling, sharding
from bridge.evaluation import runner
from bridge.mesh import make_mesh
from bridge.tasks import get_task
from stage_helpers import tiny_decoder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = sharding.DEFAULT_RULES


@pytest.fixture(scope="module")
def setup():
    tokenizer = models.char_tokenizer(string.printable)
    task = get_task("arithmetic", digits=2, num_train=8, num_test=7)
    return dict(tokenizer=tokenizer, task=task, model=tiny_decoder(tokenizer, 0), reference=tiny_decoder(tokenizer, 1))


def _evaluate(setup, **kw):
    return runner.evaluate(setup["model"], setup["tokenizer"], setup["task"], n=2, temperature=0.0, top_p=1.0,
                           top_k=0, max_new_tokens=6, limit=7, batch_size=3, reference_model=setup["reference"],
                           progress=False, **kw)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)], ids=["fsdp8", "data2_fsdp2_tensor2"])
def test_evaluation_on_a_mesh_equals_one_device(setup, shape):
    """7 problems in batches of 3 (rows padded to the batch shards, the last batch short),
    n = 2, greedy, with the KL pass: the same completions, and the same metrics to 1e-5, as
    without a mesh; the models are sharded by their axes while it runs."""
    mesh = make_mesh(shape)
    placed = runner.on_mesh(setup["model"], mesh, RULES)
    embedding = jax.tree.leaves(placed.embed)[0]
    assert not embedding.sharding.is_fully_replicated and len(embedding.sharding.device_set) == 8
    single, sharded = _evaluate(setup), _evaluate(setup, mesh=mesh, rules=RULES)
    assert [s["completion"] for s in sharded["samples"]] == [s["completion"] for s in single["samples"]]
    assert [s["score"] for s in sharded["samples"]] == [s["score"] for s in single["samples"]]
    assert set(sharded["metrics"]) == set(single["metrics"])
    for key, value in single["metrics"].items():
        assert sharded["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert single["metrics"]["kl_to_reference"] > 1e-3  # two different models: the KL pass is exercised


def test_largest_batch_by_hand():
    """Memory 1 + 0.5 b GiB at b prompts: budget 3 fits b <= 4, budget 2 fits b <= 2, at most
    `upper`, and 0 when one prompt is over budget."""
    programs = lambda b: [abstract.ProgramMemory("eval", "decode", b, 1, 1.0, 0.5 * b, 0.0)]  # noqa: E731
    assert abstract.largest_batch(programs, 16, 3.0) == 4
    assert abstract.largest_batch(programs, 16, 2.0) == 2
    assert abstract.largest_batch(programs, 3, 100.0) == 3
    assert abstract.largest_batch(programs, 16, 1.2) == 0


def test_eval_programs_cover_the_kv_cache_and_the_batch_fits_the_budget(setup):
    """The decode program holds the KV cache of prompts * n rows (bucketed as `generate` pads
    them) and prompt + max_new_tokens slots, split over the batch shards; the batch chosen
    for a budget is the largest b whose programs, and those of every smaller b, fit it
    (against every b up to 8), smaller for a smaller budget."""
    model, mesh = setup["model"], make_mesh((1, 8, 1))
    cfg = model.config
    config = sampling.SamplingConfig(max_new_tokens=6, n=4)
    programs = functools.cache(lambda b: abstract.eval_programs((model,), config, mesh, RULES, prompts=b,
                                                                prompt_len=12))
    for b in (1, 3, 8):
        decode = next(m for m in programs(b) if m.program == "sample decode")
        rows = -(-sampling.bucket(b) // 2) * 2 * 4  # rows * 4 samples spread evenly over 8 shards
        assert (decode.rows, decode.tokens_per_row) == (rows, 12 + 6)
        cache = cfg.num_layers * 2 * rows * 18 * cfg.num_kv_heads * cfg.head_dim * 4 / 8  # k and v, float32
        assert decode.arguments_gib * 2**30 >= cache
    peaks = {b: max(m.total_gib for m in programs(b)) for b in range(1, 9)}
    assert peaks[8] > peaks[1]
    chosen = {}
    for budget_b in (6, 2):
        budget = peaks[budget_b]
        chosen[budget_b] = abstract.largest_batch(programs, 8, budget)
        assert chosen[budget_b] == max(b for b in peaks if all(peaks[k] <= budget for k in range(1, b + 1)))
    assert 2 <= chosen[2] < chosen[6]


FIT_CONFIG = """
from configs.sparse_to_dense import toy


def get_config(arg=None):
    c = toy.get_config("smoke")
    with c.unlocked():
        c.pipeline.stages = ("student_sft",)
    return c
"""


def _fit(config, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "launch.fit", f"--config={config}", "--devices=4",
                           "--prompt_len=16", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rows(stdout):
    rows = [[x.strip() for x in line.strip("| \n").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and "stage" not in line]
    return {(r[0], r[1]): r for r in rows}


def test_fit_reports_the_evaluation_programs(tmp_path):
    """launch.fit on a one-stage config: "eval" rows for the sampler (eval.batch_size * n rows,
    prompt + max_new_tokens tokens) and the scoring passes, in the over-budget verdict too."""
    config = tmp_path / "fit_config.py"
    config.write_text(FIT_CONFIG)
    proc = _fit(config, "--config.eval.batch_size=8", "--config.eval.n=4", "--hbm_gib=1e-9")
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    label = " (student; kl to student_sft)"
    decode = rows[("eval", "sample decode" + label)]
    assert decode[2:4] == ["32", str(16 + 8)] and decode[-1] == "no"
    assert {("eval", p + label) for p in ("sample prefill", "score", "score kl")} <= set(rows)
    assert "eval sample decode" + label in proc.stderr


def test_eval_cli_picks_the_batch_size_that_fits(tmp_path):
    """launch.eval --hbm_gib on one device: the batch size is `largest_batch` of the same
    programs (the longest prompt of the evaluated problems), below the configured one."""
    tokenizer = models.char_tokenizer(string.printable)
    model_dir = str(tmp_path / "model")
    models.save_hf(tiny_decoder(tokenizer, 0), model_dir, tokenizer=tokenizer)
    task = get_task("arithmetic", digits=2, num_train=8, num_test=6)
    prompt_len = max(len(task.prompt_ids(x, tokenizer)) for x in task.examples("test"))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    loaded = models.load_hf(model_dir)
    config = sampling.SamplingConfig(max_new_tokens=5, n=2, temperature=0.0, top_p=1.0, top_k=0)
    programs = lambda b: abstract.eval_programs((loaded,), config, mesh, RULES, prompts=b,  # noqa: E731
                                                prompt_len=prompt_len)
    budget = max(m.total_gib for m in programs(2))
    want = abstract.largest_batch(programs, 6, budget)
    assert 2 <= want < 6
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-m", "launch.eval", f"--checkpoint={model_dir}", "--task=arithmetic",
                           '--task_options={"digits": 2, "num_train": 8, "num_test": 6}', "--n=2",
                           "--temperature=0", "--top_p=1", "--top_k=0", "--max_new_tokens=5", "--batch_size=6",
                           f"--hbm_gib={budget!r}", f"--outdir={tmp_path / 'out'}", "--noprogress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"batch size {want} " in proc.stdout
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert results["num_problems"] == 6 and np.isfinite(results["metrics"]["avg@2"])
