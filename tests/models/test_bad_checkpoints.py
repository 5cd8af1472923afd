"""A broken checkpoint folder gives one clear error naming the problem."""

import json

import pytest
from safetensors.numpy import load_file, save_file

import hf_fixtures
from bridge import models


def _rewrite(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    hf_fixtures.tiny_hf_model(tmp_path, "qwen3")
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        models.load_hf(str(tmp_path))


def test_unexpected_tensor_is_named(tmp_path):
    hf_fixtures.tiny_hf_model(tmp_path, "qwen2")
    _rewrite(tmp_path, lambda t: t.update(extra_thing=t["model.norm.weight"]))
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra_thing'\]"):
        models.load_hf(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
    hf_fixtures.tiny_hf_model(tmp_path, "llama")
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight":
                                           t["model.layers.0.self_attn.q_proj.weight"][:, :-1].copy()}))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight: checkpoint \(48, 47\) vs model \(48, 48\)"):
        models.load_hf(str(tmp_path))


def test_unknown_model_type(tmp_path):
    hf_fixtures.tiny_hf_model(tmp_path, "qwen3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unsupported model family: model_type='mamba'"):
        models.load_hf(str(tmp_path))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_hf(str(tmp_path))
