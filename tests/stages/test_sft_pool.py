"""The SFT pool's fast paths equal the plain ones: batched tokenization, vectorized padding and
the cached epoch order."""

import numpy as np

from bridge import models, runtime, tasks
from bridge.stages import common, sft
from configs.sparse_to_dense import toy


def _plain_pad_pool(prompts, targets, pad_id):
    p, n, rows = max(map(len, prompts)), max(map(len, targets)), len(prompts)
    out = {"prompt_tokens": np.full((rows, p), pad_id, np.int32), "prompt_mask": np.zeros((rows, p), bool),
           "tokens": np.full((rows, n), pad_id, np.int32), "mask": np.zeros((rows, n), bool)}
    for i, (a, b) in enumerate(zip(prompts, targets)):
        out["prompt_tokens"][i, p - len(a):] = a
        out["prompt_mask"][i, p - len(a):] = True
        out["tokens"][i, :len(b)] = b
        out["mask"][i, :len(b)] = True
    return out


def test_pad_pool_and_batched_encoding_equal_the_one_by_one_forms():
    tokenizer = models.char_tokenizer("0123456789+=")
    task = tasks.get_task("arithmetic", digits=2, num_train=40, num_test=4)
    examples = list(task.examples("train"))
    assert sft.prompt_ids(task, examples, tokenizer) == [task.prompt_ids(e, tokenizer) for e in examples]
    texts = ["12+3=", "", "7", "99+99=198"]
    assert sft.encode_texts(tokenizer, texts) == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    ragged_prompts, ragged_targets = [[5, 6, 7], [1], [2, 3]], [[9], [8, 8, 8, 2], [2]]
    got, want = sft.pad_pool(ragged_prompts, ragged_targets, 0), _plain_pad_pool(ragged_prompts, ragged_targets, 0)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == want[key].dtype


def test_pool_order_equals_pool_rows_across_epochs(tmp_path):
    cfg = toy.get_config("smoke")
    ctx = runtime.make_context(cfg, str(tmp_path))
    unit = runtime.Unit("teacher_sft")
    for rows, batch in ((10, 3), (12, 4), (7, 7)):
        order = sft.PoolOrder(ctx, unit, rows, batch)
        for step in range(12):
            np.testing.assert_array_equal(order(step), common.pool_rows(ctx, unit, step, rows, batch))
