"""Math tasks from each file layout (jsonl, json, parquet, array_record) and their rewards.

TFDS (`tfds.data_source` over a real prepared builder) is in test_tfds_source.py."""

import json
import os

import pytest

from bridge.tasks import get_task, loaders

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
GSM8K = os.path.join(FIXTURES, "gsm8k_test.jsonl")
MATH = os.path.join(FIXTURES, "math_test.jsonl")
MATH500 = os.path.join(FIXTURES, "math500_test.jsonl")


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_gsm8k_jsonl_answers_solutions_and_reward():
    task = get_task("gsm8k", test_path=GSM8K)
    examples = task.examples("test")
    assert [x.answer for x in examples] == ["72", "10", "1500"]
    assert "<<" not in examples[0].solution and examples[0].solution.endswith("\\boxed{72}.")
    assert examples[0].prompt.startswith("Natalia") and "\\boxed{}" in examples[0].prompt
    assert task.chat and task.max_answer_tokens == 1024
    good = task.reward("48/2 = 24, so 48 + 24 = 72.\n#### 72", examples[0])
    assert good.score == 1.0 and good.format_ok and good.extracted_answer == "72"
    assert task.reward("so \\boxed{1,500} houses", examples[2]).score == 1.0
    assert task.reward(examples[1].solution, examples[1]).score == 1.0
    wrong = task.reward("I get \\boxed{71}", examples[0])
    assert wrong.score == 0.0 and wrong.format_ok and wrong.info["boxed"]
    none = task.reward("no idea", examples[0])
    assert none.score == 0.0 and not none.format_ok and none.extracted_answer is None
    strict = get_task("gsm8k", test_path=GSM8K, require_boxed=True)
    assert strict.reward("#### 72", examples[0]).score == 0.0
    with pytest.raises(ValueError, match="no data for split 'train'.*train_path"):
        task.examples("train")


def test_math_jsonl_answer_from_boxed_solution():
    task = get_task("math", test_path=MATH)
    examples = task.examples("test")
    assert [x.answer for x in examples] == ["\\dfrac{3}{4}", "2", "2\\sqrt{2}"]
    assert examples[0].meta == {"level": "Level 1", "type": "Prealgebra"}
    assert task.reward("... = \\boxed{0.75}", examples[0]).score == 1.0
    assert task.reward("... = \\boxed{\\sqrt{8}}", examples[2]).score == 1.0
    assert task.reward("... = \\boxed{\\sqrt{7}}", examples[2]).score == 0.0
    for example in examples:
        assert task.reward(example.solution, example).score == 1.0


def test_math500_parquet_and_directory_and_limit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _records(MATH500)
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(records), folder / "test-00000-of-00001.parquet")
    task = get_task("math500", test_path=str(folder))
    examples = task.examples("test")
    assert [x.id for x in examples] == ["test/test/precalculus/807.json", "test/test/prealgebra/1.json"]
    assert examples[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert task.reward("\\boxed{(3, \\frac{\\pi}{2})}", examples[0]).score == 1.0
    assert len(get_task("math500", test_path=str(folder / "*.parquet"), limit=1).examples("test")) == 1


def test_aime_json_and_array_record_and_raw_prompt(tmp_path):
    records = [
        {
            "id": 60,
            "problem": "Find $N$.",
            "solution": "... so $N=\\boxed{204}$",
            "answer": "204",
            "url": "u",
            "year": "2024",
        },
        {"ID": "2025-I-1", "Problem": "Find $M$.", "Answer": 70},
    ]
    (tmp_path / "aime.json").write_text(json.dumps(records))
    task = get_task("aime", test_path=str(tmp_path / "aime.json"), chat=False)
    examples = task.examples("test")
    assert [x.id for x in examples] == ["test/60", "test/2025-I-1"]
    assert [x.answer for x in examples] == ["204", "70"] and examples[1].solution is None
    assert task.reward("The answer is 070.", examples[1]).score == 1.0
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "aime.array_record"), "group_size:1")
    for record in records:
        writer.write(json.dumps(record).encode())
    writer.close()
    again = get_task("aime", test_path=str(tmp_path / "aime.array_record")).examples("test")
    assert [x.prompt for x in again] == [x.prompt for x in examples]


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="No data files"):
        loaders.load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        loaders.load_records(str(tmp_path / "bad.json"))
    (tmp_path / "x.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="neither an answer"):
        get_task("math", test_path=str(tmp_path / "x.jsonl")).examples("test")
