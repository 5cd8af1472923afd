"""What a run on a real Hugging Face checkpoint reads from its folder: the tokenizer (following
an override of the model's hf_dir) and the stop ids of generation_config.json."""

import json

import pytest

from bridge import models, runtime
from stage_helpers import smoke_config, tiny_decoder


def _checkpoint(path, alphabet, extra_eos=()):
    tokenizer = models.char_tokenizer(alphabet)
    models.save_hf(tiny_decoder(tokenizer), str(path), tokenizer=tokenizer)
    gen = path / "generation_config.json"
    config = json.loads(gen.read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, *extra_eos]
    gen.write_text(json.dumps(config))
    return tokenizer


def _config(folder):
    cfg = smoke_config(["student_sft"])
    with cfg.unlocked():
        cfg.tokenizer = ""
        cfg.models.student.hf_dir = str(folder)
    return cfg


def test_the_tokenizer_follows_the_models_folder_and_stops_on_generation_config_eos(tmp_path):
    first = _checkpoint(tmp_path / "a", "0123456789+=", extra_eos=(5,))
    second = _checkpoint(tmp_path / "b", "0123456789+=-*")
    ctx = runtime.make_context(_config(tmp_path / "a"), str(tmp_path / "run_a"))
    assert ctx.tokenizer.get_vocab() == first.get_vocab()
    assert set(ctx.eos_ids) == {first.eos_token_id, 5}  # the tokenizer's eos and generation_config's
    ctx = runtime.make_context(_config(tmp_path / "b"), str(tmp_path / "run_b"))
    assert ctx.tokenizer.get_vocab() == second.get_vocab() and ctx.eos_ids == (second.eos_token_id,)


def test_no_tokenizer_and_no_model_folder_is_named():
    cfg = smoke_config(["student_sft"])
    with cfg.unlocked():
        cfg.tokenizer = ""
    with pytest.raises(ValueError, match="config.tokenizer is empty"):
        runtime.tokenizer_spec(cfg)
