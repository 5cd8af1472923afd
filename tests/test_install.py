"""A fresh install works: this project's kernels and transformers' model classes live in one
process. transformers >= 5.25 requires Hugging Face's `kernels` distribution, so no top-level
package of ours may be named `kernels`; ours are `bridge.kernels`."""

import ast
import importlib.util
import os
import pathlib

import numpy as np
import torch
import transformers

import bridge.kernels.attention.api as attention_api
import bridge.kernels.logprobs as logprobs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_project_kernels_and_transformers_models_in_one_process():
    assert callable(logprobs.token_logprobs) and callable(attention_api.attention)
    ids = torch.tensor([[3, 7, 11, 5]])
    for config_cls, model_cls in [(transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                                  (transformers.LlamaConfig, transformers.LlamaForCausalLM)]:
        config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            max_position_embeddings=64)
        torch.manual_seed(0)
        with torch.no_grad():
            logits = model_cls(config).eval()(input_ids=ids).logits
        assert logits.shape == (1, 4, 64) and np.isfinite(logits.numpy()).all()
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # Hugging Face's package, never a folder of this repository
        origin = pathlib.Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
        inside_repo = ROOT in origin.parents and "site-packages" not in origin.parts
        assert not inside_repo, f"`import kernels` resolves into this repository: {origin}"


def test_no_top_level_package_shadows_a_dependency():
    """Every top-level folder with Python code is one of ours by name, never `kernels`."""
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert "kernels" not in top
    assert top <= {"bridge", "launch", "configs", "benchmarks", "tests"}, top


def test_kernels_import_nothing_from_the_training_side():
    """bridge/kernels is self-contained: it imports jax/numpy and itself, no other bridge module."""
    for path in (ROOT / "bridge" / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "bridge" or name.startswith("bridge."):
                    assert name.startswith("bridge.kernels"), f"{path.relative_to(ROOT)} imports {name}"
