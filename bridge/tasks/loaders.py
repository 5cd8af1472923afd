"""Read data set records (dicts) from local files or a prepared TFDS data set; nothing downloads.

Files, in the layouts the public releases use on the Hugging Face hub:
  *.jsonl   one JSON object per line (GSM8K's train.jsonl / test.jsonl, MATH-500's test.jsonl)
  *.json    a JSON list of objects
  *.parquet a table, one row per record (hub "refs/convert/parquet" and data/*.parquet layouts)
  *.array_record  one JSON-encoded object per record (read through grain's ArrayRecordDataSource)
A path may be a file, a directory (every supported file in it, sorted) or a glob pattern.
TFDS: `load_tfds(name, split, data_dir)` reads an already prepared builder with
`tfds.data_source` (array_record format), decoding bytes fields to str.
A malformed file (bad JSON or UTF-8, a record that is not an object, no records) raises one
ValueError naming the file and the line (JSONL, JSON) or record number; `record_location` names
where an example of a file-backed task came from, for errors found after loading.
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


def _read_file(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for every record of one file; `where` names the file and the line
    (JSONL) or record number, and so does the one ValueError a malformed file raises."""
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.endswith(".json"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = raw[:error.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not valid UTF-8.") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}).") from error
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
        return _objects(path, "record", data)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{path}: not a readable parquet file ({error}).") from error
        return _objects(path, "row", rows)
    if path.endswith(".array_record"):
        import grain.python as grain_python

        source = grain_python.ArrayRecordDataSource([path])
        out = []
        for i in range(len(source)):
            try:
                out.append(json.loads(source[i]))
            except ValueError as error:  # JSON or UTF-8
                raise ValueError(f"{path} (record {i + 1}): not a JSON object ({error}).") from error
        return _objects(path, "record", out)
    raise ValueError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}.")


def _read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not valid UTF-8 (byte {error.start + 1} of the line).") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}, column {error.colno}).") from error
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got a {type(record).__name__}.")
            out.append((where, record))
    return out


def _objects(path: str, what: str, items: list) -> list[tuple[str, dict[str, Any]]]:
    """Numbers the records of a file that has no lines; each must be an object."""
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ValueError(f"{path} ({what} {i}): expected a JSON object, got a {type(item).__name__}.")
        out.append((f"{path} ({what} {i})", item))
    return out


def load_located_records(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for all records under `path` (file, directory or glob), in file order;
    `where` is "file:line" for JSONL and "file (record i)" otherwise."""
    records = []
    for file in _files(path):
        records.extend(_read_file(file))
    return records


def load_records(path: str) -> list[dict[str, Any]]:
    """All records under `path` (file, directory or glob), in file order."""
    return [record for _, record in load_located_records(path)]


def record_location(task, example) -> str | None:
    """Where `example` of `task` was read: "file:line" (JSONL), "file (record i)", or "TFDS <name>
    split <split> (record i)"; None when the task does not record it (synthetic tasks)."""
    return getattr(task.load_split, "locations", {}).get(example.id)


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
) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) for `split` from `paths[split]` if set, else from TFDS `tfds_name`; a split
    without records is an error naming its source."""
    path = paths.get(split)
    if path:
        records = load_located_records(path)
    elif tfds_name:
        records = [(f"TFDS {tfds_name} split {split} (record {i + 1})", r)
                   for i, r in enumerate(load_tfds(tfds_name, split, tfds_data_dir))]
    else:
        raise ValueError(
            f"Task {task!r}: no data for split {split!r}; pass {split}_path=<jsonl|parquet|"
            f"json|array_record file or folder> or tfds_name=<prepared TFDS builder>."
        )
    if not records:
        raise ValueError(f"{path or f'TFDS {tfds_name}'}: no records for split {split!r} of task {task!r} "
                         "(an empty file?).")
    return records
