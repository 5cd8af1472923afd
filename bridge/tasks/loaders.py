"""Read data set records (dicts) from local files or a prepared TFDS data set; nothing downloads.

Files, in the layouts the public releases use on the Hugging Face hub:
  *.jsonl   one JSON object per line (GSM8K's train.jsonl / test.jsonl, MATH-500's test.jsonl)
  *.json    a JSON list of objects
  *.parquet a table, one row per record (hub "refs/convert/parquet" and data/*.parquet layouts)
  *.array_record  one JSON-encoded object per record (read through grain's ArrayRecordDataSource)
A path may be a file, a directory (every supported file in it, sorted) or a glob pattern.
TFDS: `load_tfds(name, split, data_dir)` reads an already prepared builder with
`tfds.data_source` (array_record format), decoding bytes fields to str.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

EXTENSIONS = (".jsonl", ".json", ".parquet", ".array_record")


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, name)
            for name in os.listdir(path)
            if any(name.endswith(ext) for ext in EXTENSIONS)
        )
    elif os.path.exists(path):
        files = [path]
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"No data files at {path!r} (expected {', '.join(EXTENSIONS)}).")
    return files


def _read_file(path: str) -> list[dict[str, Any]]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
        return data
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.endswith(".array_record"):
        import grain.python as grain_python

        source = grain_python.ArrayRecordDataSource([path])
        return [json.loads(source[i]) for i in range(len(source))]
    raise ValueError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}.")


def load_records(path: str) -> list[dict[str, Any]]:
    """All records under `path` (file, directory or glob), in file order."""
    records = []
    for file in _files(path):
        records.extend(_read_file(file))
    return records


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _decode(value.item())
    return value


def load_tfds(name: str, split: str, data_dir: str | None = None) -> list[dict[str, Any]]:
    """Records of a prepared TFDS builder (array_record files) through `tfds.data_source`."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds raises several types for a missing builder or split
        raise FileNotFoundError(
            f"TFDS data set {name!r} split {split!r} is not prepared in data_dir={data_dir!r}: {error}. "
            "Prepare it with `tfds build` (file_format=array_record) or pass a file path instead."
        ) from error
    return [{key: _decode(value) for key, value in source[i].items()} for i in range(len(source))]


def load_split_records(
    split: str, *, paths: dict[str, str | None], tfds_name: str | None, tfds_data_dir: str | None, task: str
) -> list[dict[str, Any]]:
    """Records for `split` from `paths[split]` if set, else from TFDS `tfds_name`."""
    path = paths.get(split)
    if path:
        return load_records(path)
    if tfds_name:
        return load_tfds(tfds_name, split, tfds_data_dir)
    raise ValueError(
        f"Task {task!r}: no data for split {split!r}; pass {split}_path=<jsonl|parquet|"
        f"json|array_record file or folder> or tfds_name=<prepared TFDS builder>."
    )
