"""Math tasks read through a real prepared TFDS builder (`tfds.data_source`, array_record), no fakes.

Each builder below is a `tfds.core.GeneratorBasedBuilder` whose examples are generated in memory,
prepared with `download_and_prepare` into a tmp data_dir (file_format="array_record"; no network,
no TensorFlow). The builders are not registered (`skip_registration=True`), so the loader finds
them the way it finds a data set prepared by another process: from the files in data_dir
(dataset_info.json, features.json, *.array_record-NNNNN-of-NNNNN).
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bridge.tasks import get_task, loaders

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")

# Text that must come back byte for byte: unicode, LaTeX backslashes and braces, newlines, tabs.
TRICKY_GSM8K = {
    "question": "Zoë has 1,200 €\tand spends ½ of it 🙂.\nHow much is left?  ",
    "answer": "1,200/2 = <<1200/2=600>>600\n#### 600",
}
TRICKY_MATH = {
    "problem": "Compute $\\left(\\frac{\\sqrt{2}}{2}\\right)^{2}$ — «exactly».",
    "solution": "It is $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.\n\nNested: {a{b}}.",
    "level": "Level 3",
    "type": "Intermediate Algebra",
}


def _fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return [json.loads(line) for line in f]


class _InMemoryBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Records of `SPLITS[split]` (dicts) with features `FEATURES`, keyed by position."""

    VERSION = tfds.core.Version("1.0.0")
    # No source folder (checksums, metadata): nothing is downloaded. Without this, tfds looks the
    # folder up through `importlib_resources`, which tfds imports lazily but does not require on
    # Python >= 3.9 and this venv does not have (ModuleNotFoundError for a class in a package).
    code_path = None
    FEATURES: dict = {}
    SPLITS: dict = {}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self.FEATURES))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(records) for split, records in self.SPLITS.items()}

    def _generate_examples(self, records):
        for index, record in enumerate(records):
            yield index, record


class BridgeTestGsm8k(_InMemoryBuilder, skip_registration=True):
    FEATURES = {"question": tfds.features.Text(), "answer": tfds.features.Text()}
    SPLITS = {
        "train": _fixture("gsm8k_test.jsonl") + [TRICKY_GSM8K],
        "test": _fixture("gsm8k_test.jsonl")[:2],
    }


class BridgeTestMath(_InMemoryBuilder, skip_registration=True):
    FEATURES = {key: tfds.features.Text() for key in ("problem", "solution", "level", "type")}
    SPLITS = {"test": _fixture("math_test.jsonl") + [TRICKY_MATH]}


class BridgeTestAime(_InMemoryBuilder, skip_registration=True):
    FEATURES = {"ID": tfds.features.Text(), "Problem": tfds.features.Text(), "Answer": np.int64}
    SPLITS = {
        "test": [
            {"ID": "2024-I-2", "Problem": "Find $xy$.", "Answer": 25},
            {"ID": "2025-I-1", "Problem": "Find the sum of all bases $b$.", "Answer": 70},
            {"ID": "2025-II-15", "Problem": "Find $m+n$.", "Answer": 7},
        ]
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for builder_class in (BridgeTestGsm8k, BridgeTestMath, BridgeTestAime):
        builder_class(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def _sorted(records):
    return sorted(records, key=lambda r: json.dumps(r, sort_keys=True))


def test_builders_are_prepared_as_array_record_and_not_registered(data_dir):
    names = ("bridge_test_gsm8k", "bridge_test_math", "bridge_test_aime")
    for name in names:  # the loader must find them through the files in data_dir
        with pytest.raises(tfds.core.registered.DatasetNotFoundError):
            tfds.core.registered.imported_builder_cls(name)
    files = sorted(os.listdir(os.path.join(data_dir, "bridge_test_gsm8k", "1.0.0")))
    assert "dataset_info.json" in files
    assert [f for f in files if ".array_record-" in f] == [
        "bridge_test_gsm8k-test.array_record-00000-of-00001",
        "bridge_test_gsm8k-train.array_record-00000-of-00001",
    ]
    source = tfds.data_source("bridge_test_gsm8k", split="train", data_dir=data_dir, download=False)
    assert type(source).__name__ == "ArrayRecordDataSource" and len(source) == 4


@pytest.mark.parametrize(
    "name, split, expected",
    [
        ("bridge_test_gsm8k", "train", BridgeTestGsm8k.SPLITS["train"]),
        ("bridge_test_gsm8k", "test", BridgeTestGsm8k.SPLITS["test"]),
        ("bridge_test_math", "test", BridgeTestMath.SPLITS["test"]),
        ("bridge_test_aime", "test", BridgeTestAime.SPLITS["test"]),
    ],
)
def test_load_tfds_round_trips_records_exactly(data_dir, name, split, expected):
    records = loaders.load_tfds(name, split, data_dir)
    assert _sorted(records) == _sorted(expected)  # same text byte for byte, ints stay ints
    for record in records:
        assert all(type(v) is (int if k == "Answer" else str) for k, v in record.items()), record
    assert records == loaders.load_tfds(name, split, data_dir)  # a fixed order on every read


def test_gsm8k_task_through_tfds(data_dir):
    task = get_task("gsm8k", tfds_name="bridge_test_gsm8k", tfds_data_dir=data_dir)
    train = task.examples("train")
    assert [x.id for x in train] == [f"train/{i:06d}" for i in range(4)]
    by_answer = {x.answer: x for x in train}
    assert sorted(by_answer) == ["10", "1500", "600", "72"]
    tricky = by_answer["600"]
    assert tricky.prompt.startswith("Zoë has 1,200 €\tand spends ½ of it 🙂.\nHow much is left?\n")
    assert tricky.solution == "1,200/2 = 600\nThe answer is \\boxed{600}."
    assert by_answer["72"].prompt.startswith("Natalia sold clips to 48 of her friends in April")
    assert task.reward("so \\boxed{1,500} houses", by_answer["1500"]).score == 1.0
    assert sorted(x.answer for x in task.examples("test")) == ["10", "72"]


def test_math_task_through_tfds_keeps_solution_and_meta(data_dir):
    task = get_task("math", tfds_name="bridge_test_math", tfds_data_dir=data_dir)
    by_answer = {x.answer: x for x in task.examples("test")}
    assert sorted(by_answer) == ["2", "2\\sqrt{2}", "\\dfrac{3}{4}", "\\frac{1}{2}"]
    tricky = by_answer["\\frac{1}{2}"]
    assert tricky.solution == TRICKY_MATH["solution"]
    assert tricky.prompt.startswith(TRICKY_MATH["problem"] + "\n")
    assert tricky.meta == {"level": "Level 3", "type": "Intermediate Algebra"}
    assert by_answer["\\dfrac{3}{4}"].meta == {"level": "Level 1", "type": "Prealgebra"}
    assert task.reward("... = \\boxed{0.5}", tricky).score == 1.0


def test_aime_task_through_tfds_int_answers_and_ids(data_dir):
    task = get_task("aime", tfds_name="bridge_test_aime", tfds_data_dir=data_dir, chat=False)
    examples = {x.id: x for x in task.examples("test")}
    assert {k: v.answer for k, v in examples.items()} == {
        "test/2024-I-2": "25",
        "test/2025-I-1": "70",
        "test/2025-II-15": "7",
    }
    assert examples["test/2025-I-1"].solution is None
    assert task.reward("The answer is 070.", examples["test/2025-I-1"]).score == 1.0


def test_unprepared_builder_or_split_raises_and_downloads_nothing(data_dir):
    before = sorted(os.listdir(data_dir))
    with pytest.raises(FileNotFoundError, match="'bridge_test_missing' split 'test' is not prepared"):
        get_task("gsm8k", tfds_name="bridge_test_missing", tfds_data_dir=data_dir).examples("test")
    with pytest.raises(FileNotFoundError, match="split 'validation' is not prepared.*Unknown split"):
        loaders.load_tfds("bridge_test_math", "validation", data_dir)
    assert sorted(os.listdir(data_dir)) == before
