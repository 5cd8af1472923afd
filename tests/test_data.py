"""Input pipeline: shapes, padding, determinism, per-epoch reshuffle, host sharding, resume."""

import json

import numpy as np
import pytest

from bridge.data import make_prompt_iterator
from bridge.models.tokenizer import char_tokenizer
from bridge.tasks import arithmetic, countdown, get_task


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(arithmetic.ALPHABET + countdown.ALPHABET)


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic", num_train=16, num_test=8, seed=0)


def _ids(batch):
    return [x.id for x in batch.examples]


def test_prompt_batch_shape_left_padding_and_decoding(tokenizer, task):
    it = make_prompt_iterator(task, tokenizer, "train", batch_size=4, seed=0)
    batch = next(it)
    assert batch.ids.shape == (4, 10) and batch.ids.dtype == np.int32 and batch.mask.all()
    for row, example in zip(batch.ids, batch.examples):
        assert tokenizer.decode(row.tolist()) == example.prompt
    varied = get_task("countdown", num_numbers=3, max_number=100, num_train=40, num_test=4)
    it = make_prompt_iterator(varied, tokenizer, "train", batch_size=8, seed=1, buckets=(12, 16, 32))
    for _ in range(5):
        batch = next(it)
        lengths = [len(x.prompt) for x in batch.examples]
        assert batch.ids.shape[1] == min(b for b in (12, 16, 32) if b >= max(lengths))
        for row, m, example in zip(batch.ids, batch.mask, batch.examples):
            n = len(example.prompt)
            assert not m[:-n].any() and m[-n:].all() and (row[:-n] == tokenizer.pad_token_id).all()
            assert tokenizer.decode(row[m].tolist()) == example.prompt
        assert [len(t) for t in batch.token_lists()] == lengths


def test_same_seed_same_order_other_seed_other_order(tokenizer, task):
    run = lambda seed: [
        _ids(next(it)) for it in [make_prompt_iterator(task, tokenizer, "train", 4, seed)] for _ in range(8)
    ]
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_each_epoch_is_a_fresh_permutation(tokenizer, task):
    it = make_prompt_iterator(task, tokenizer, "train", batch_size=4, seed=0)
    batches = [next(it) for _ in range(8)]
    epoch0 = sum((_ids(b) for b in batches[:4]), [])
    epoch1 = sum((_ids(b) for b in batches[4:]), [])
    everything = sorted(x.id for x in task.examples("train"))
    assert sorted(epoch0) == everything and sorted(epoch1) == everything
    assert epoch0 != epoch1
    assert [b.epoch for b in batches] == [0, 0, 0, 0, 1, 1, 1, 1]
    unshuffled = make_prompt_iterator(task, tokenizer, "train", 4, 0, shuffle=False, num_epochs=1)
    assert sum((_ids(b) for b in unshuffled), []) == [x.id for x in task.examples("train")]


def test_two_hosts_see_disjoint_halves_of_the_global_batch(tokenizer, task):
    single = make_prompt_iterator(task, tokenizer, "train", 8, seed=5)
    hosts = [
        make_prompt_iterator(task, tokenizer, "train", 8, seed=5, process_index=i, process_count=2)
        for i in range(2)
    ]
    for _ in range(4):
        whole = next(single)
        h0, h1 = next(hosts[0]), next(hosts[1])
        assert h0.ids.shape == (4, 10)
        assert not set(_ids(h0)) & set(_ids(h1))
        assert _ids(h0) + _ids(h1) == _ids(whole)
    with pytest.raises(ValueError, match="not divisible"):
        make_prompt_iterator(task, tokenizer, "train", 7, seed=5, process_index=0, process_count=2)


def test_resume_from_saved_state_gives_the_same_next_batches(tokenizer, task):
    it = make_prompt_iterator(task, tokenizer, "train", 4, seed=9)
    for _ in range(3):
        next(it)
    saved = json.loads(json.dumps(it.get_state()))
    expected = [(_ids(b), b.ids.copy(), b.epoch) for b in (next(it), next(it), next(it))]
    resumed = make_prompt_iterator(task, tokenizer, "train", 4, seed=9)
    resumed.set_state(saved)
    got = [(_ids(b), b.ids, b.epoch) for b in (next(resumed), next(resumed), next(resumed))]
    for (ids_a, arr_a, ep_a), (ids_b, arr_b, ep_b) in zip(expected, got):
        assert ids_a == ids_b and ep_a == ep_b
        np.testing.assert_array_equal(arr_a, arr_b)
    other = make_prompt_iterator(task, tokenizer, "train", 4, seed=10)
    with pytest.raises(ValueError, match="does not match.*seed"):
        other.set_state(saved)


def test_long_prompts_dropped_and_too_few_examples_named(tokenizer):
    varied = get_task("countdown", num_numbers=3, max_number=100, num_train=40, num_test=4)
    it = make_prompt_iterator(varied, tokenizer, "train", 4, seed=0, max_prompt_len=12)
    seen = [x for _ in range(20) for x in next(it).examples]
    assert seen and all(len(x.prompt) <= 12 for x in seen)
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_prompt_iterator(varied, tokenizer, "test", 8, seed=0)
