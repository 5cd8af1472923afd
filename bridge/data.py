"""Input pipeline: a task split -> fixed-shape token batches, deterministic and checkpointable.

Order: grain shuffles the example indices of the whole split with `seed`, reshuffling every epoch
(`MapDataset.shuffle(seed).repeat()` reseeds per epoch), and cuts the stream into *global*
batches of `batch_size`; host `process_index` of `process_count` takes rows
[process_index * b, (process_index + 1) * b) of each global batch, b = batch_size / process_count.
So hosts see disjoint prompts, and the global batch at step s is the same for any host count.

Shapes: prompts are tokenized once (`task.prompt_ids`), left-padded with the pad id to the
smallest bucket length holding the longest prompt of the batch (`buckets=None`: one length for the
whole split, so every batch has one shape). Prompts longer than `max_prompt_len` are dropped (and
logged) before shuffling, identically on every host.

State: `iterator.get_state()` is a small JSON-serializable dict (grain's position plus the fields
that must match on restore); `set_state` restores it, so a resumed run sees the same next batches.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import grain
import jax
import numpy as np
from absl import logging

from bridge.models.tokenizer import pad_id as tokenizer_pad_id
from bridge.sampling.sampler import left_pad
from bridge.tasks.base import Example, Task


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """ids int32[b, L] left-padded prompts; mask bool[b, L] (True on tokens); the b examples;
    epoch of the batch's first row (counted over the whole split)."""

    ids: np.ndarray
    mask: np.ndarray
    examples: list[Example]
    epoch: int

    def token_lists(self) -> list[list[int]]:
        """The unpadded prompts (the sampler's ragged input)."""
        return [row[m].tolist() for row, m in zip(self.ids, self.mask)]


def _bucket_length(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")


class BatchIterator:
    """Deterministic, host-sharded, checkpointable iterator of batches over one task split."""

    def __init__(
        self,
        examples: Sequence[Example],
        build: Callable[[list[int], int], object],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        num_epochs: int | None,
        process_index: int,
        process_count: int,
        description: dict,
    ):
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} (global) is not divisible by the " f"{process_count} hosts."
            )
        if len(examples) < batch_size:
            raise ValueError(
                f"{description}: {len(examples)} usable examples, fewer than one batch " f"of {batch_size}."
            )
        self.local_batch_size = batch_size // process_count
        self._examples = examples
        self._build = build
        self._rows = slice(process_index * self.local_batch_size, (process_index + 1) * self.local_batch_size)
        dataset = grain.MapDataset.range(len(examples))
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset.repeat(num_epochs).batch(batch_size, drop_remainder=True)
        self._batch_size = batch_size
        # indices only: no reader threads or prefetch needed
        self._iterator = iter(
            dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        )
        self._check = {
            **description,
            "num_examples": len(examples),
            "batch_size": batch_size,
            "seed": seed,
            "shuffle": shuffle,
        }

    def __iter__(self):
        return self

    def __next__(self):
        step = self._iterator.get_state()["next_index"]
        indices = next(self._iterator)
        local = [int(i) for i in indices[self._rows]]
        return self._build(local, step * self._batch_size // len(self._examples))

    def get_state(self) -> dict:
        return {"grain": dict(self._iterator.get_state()), **self._check}

    def set_state(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._check.items() if state.get(k) != v}
        if mismatched:
            raise ValueError(
                f"Data iterator state does not match this pipeline (saved, current): "
                f"{mismatched}; resume with the same task, split, batch size and seed."
            )
        self._iterator.set_state(state["grain"])


def _usable(task: Task, split: str, max_len: int | None, encode, length=len) -> tuple[list, list]:
    """(examples, encodings) of the split whose encoding is at most max_len tokens long."""
    examples, encoded = [], []
    for example in task.examples(split):
        item = encode(example)
        if max_len is None or length(item) <= max_len:
            examples.append(example)
            encoded.append(item)
    dropped = len(task.examples(split)) - len(examples)
    if dropped:
        logging.warning(
            "%s/%s: dropped %d of %d examples longer than %d tokens.",
            task.name,
            split,
            dropped,
            len(task.examples(split)),
            max_len,
        )
    return examples, encoded


def _hosts(process_index, process_count):
    return (
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )


def make_prompt_iterator(
    task: Task,
    tokenizer,
    split: str,
    batch_size: int,
    seed: int,
    *,
    buckets: Sequence[int] | None = None,
    max_prompt_len: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    pad_id: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Batches of left-padded prompts (`PromptBatch`), `batch_size` global, `batch_size /
    process_count` rows per host. num_epochs=None repeats forever; hosts default to jax's."""
    process_index, process_count = _hosts(process_index, process_count)
    examples, ids = _usable(task, split, max_prompt_len, lambda ex: task.prompt_ids(ex, tokenizer))
    lengths = sorted(buckets) if buckets else [max(map(len, ids), default=1)]
    pad = tokenizer_pad_id(tokenizer) if pad_id is None else pad_id

    def build(local: list[int], epoch: int) -> PromptBatch:
        rows = [ids[i] for i in local]
        out, mask = left_pad(rows, _bucket_length(max(map(len, rows)), lengths), len(rows), pad)
        return PromptBatch(out, mask, [examples[i] for i in local], epoch)

    return BatchIterator(
        examples,
        build,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        description={"task": task.name, "split": split, "kind": "prompts"},
    )
