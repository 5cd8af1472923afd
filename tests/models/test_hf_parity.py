"""load_hf logits equal transformers' on tiny random models of every family (f32, 1e-4)."""

import numpy as np
import pytest
import transformers

import hf_fixtures
from bridge import models


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("family,overrides", [
    ("qwen3", {}),
    ("qwen3", dict(tie_word_embeddings=False, num_key_value_heads=3)),
    ("qwen2", {}),
    ("llama", {}),
    ("llama", dict(rope_scaling=None, num_key_value_heads=6, tie_word_embeddings=True)),
])
def test_logits_match_transformers(tmp_path, family, overrides, scan_layers):
    torch_model = hf_fixtures.tiny_hf_model(tmp_path, family, **overrides)
    model = models.load_hf(str(tmp_path), scan_layers=scan_layers)
    assert model.config.family == family
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 13))
    ours = np.asarray(model(ids))
    theirs = hf_fixtures.torch_logits(torch_model, ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_left_padded_rows_match_unpadded(tmp_path):
    torch_model = hf_fixtures.tiny_hf_model(tmp_path, "qwen3")
    model = models.load_hf(str(tmp_path))
    ids = np.array([[0, 0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7]])
    mask = np.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7], bool)
    padded = np.asarray(model(ids, attention_mask=mask))
    alone = hf_fixtures.torch_logits(torch_model, ids[:1, 3:])
    np.testing.assert_allclose(padded[0, 3:], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,scan_layers", [("qwen3", False), ("qwen2", False), ("llama", False),
                                                ("qwen3", True)])
def test_round_trip_through_transformers(tmp_path, family, scan_layers):
    torch_model = hf_fixtures.tiny_hf_model(tmp_path / "in", family, num_hidden_layers=3)
    model = models.load_hf(str(tmp_path / "in"), scan_layers=scan_layers)
    models.save_hf(model, str(tmp_path / "out"), max_shard_bytes=20_000)  # force an index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    ref = torch_model.state_dict()
    got = reloaded.state_dict()
    assert set(ref) == set(got)
    for name in ref:
        np.testing.assert_array_equal(got[name].numpy(), ref[name].numpy(), err_msg=name)
    again = models.load_hf(str(tmp_path / "out"), scan_layers=scan_layers)
    ids = np.arange(10)[None] % model.config.vocab_size
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
