"""Hugging Face checkpoints in and out: safetensors <-> NNX `Decoder`, no torch.

Parameter names follow transformers' Llama/Qwen layout. Linear kernels are stored [out, in]
there and [in, out] here, so they are transposed on the way in and out. Loading streams one
tensor at a time from the safetensors files onto its devices, so host memory stays near one
tensor, and the model is built abstractly (`nnx.eval_shape`) so no random init is spent.

A broken folder raises one ValueError (FileNotFoundError when a file is missing) naming the
file and, where there is one, the key, line or tensor: unreadable JSON, a config.json without
a required key, a truncated or empty safetensors file, missing, unexpected or misshapen
tensors, and NaN/inf weights (checked as each tensor loads). `check_hf_dir` runs every check
but the last without reading any weights, for validation before a run writes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from bridge.models.config import ModelConfig
from bridge.models.decoder import Decoder

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(path: tuple) -> tuple[str, bool]:
    """NNX parameter path -> (transformers tensor name, whether it is a transposed kernel)."""
    if path == ("embed",):
        return "model.embed_tokens.weight", False
    if path == ("lm_head",):
        return "lm_head.weight", True
    *prefix, leaf = (str(p) for p in path)
    name = ".".join(["model", *prefix, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
    return name, leaf == "kernel"


def hf_tensors(path: tuple, cfg: ModelConfig) -> tuple[list[str], bool, bool]:
    """(transformers names, transposed kernel, stacked) of one parameter: with `scan_layers`
    a stacked block parameter [L, ...] holds the tensors of layers 0..L-1."""
    if cfg.scan_layers and path[0] == "layers":
        names = [hf_name(("layers", i, *path[1:]))[0] for i in range(cfg.num_layers)]
        return names, hf_name(path)[1], True
    name, transpose = hf_name(path)
    return [name], transpose, False


def iter_params(model: Decoder) -> Iterator[tuple[tuple, nnx.Param]]:
    """(path, Param) for every parameter of the model, in a stable order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield tuple(path), node


def read_json(path: str):
    """A JSON file's value; malformed JSON raises one ValueError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}).") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 (byte {error.start}).") from error


def _safe_open(file: str):
    try:
        return safe_open(file, framework="flax")
    except SafetensorError as error:
        raise ValueError(f"{file}: not a readable safetensors file, truncated or damaged ({error}).") from error


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
        return [os.path.join(path, x) for x in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"No safetensors weights in {path} (expected model.safetensors or an index).")
    return [os.path.join(path, x) for x in found]


def read_config(path: str, *, dtype=jnp.float32, param_dtype=None) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model folder?")
    hf = read_json(cfg_path)
    try:
        cfg = ModelConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype)
    except KeyError as error:
        raise ValueError(f"{cfg_path}: missing required key {error.args[0]!r}.") from error
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{cfg_path}: {error}") from error
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        eos = read_json(gen).get("eos_token_id")
        if eos is not None:
            cfg = cfg.replace(eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
    return cfg


def _locate(path: str, cfg: ModelConfig):
    """(abstract model, its parameters by path, tensor name -> file) of a checkpoint folder;
    raises ValueError naming every missing or unexpected tensor."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    params = dict(iter_params(model))
    expected = {name for p in params for name in hf_tensors(p, cfg)[0]}
    location = {}
    for file in _weight_files(path):
        with _safe_open(file) as f:
            for key in f.keys():
                location[key] = file
    missing = sorted(set(expected) - set(location))
    unexpected = sorted(k for k in set(location) - set(expected)
                        if not k.endswith(_IGNORED_SUFFIXES)
                        and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    if missing or unexpected:
        raise ValueError(f"Checkpoint {path} does not match the {cfg.family} architecture: "
                         f"missing tensors {missing}; unexpected tensors {unexpected}.")
    return model, params, location


def check_hf_dir(path: str) -> None:
    """Checks a model folder without loading weights: its config.json, every safetensors
    header and the tensor names against the architecture (see the module docstring)."""
    _locate(path, read_config(path))


def load_hf(path: str, dtype=jnp.float32, *, param_dtype=None, mesh=None, rules=None,
            remat: bool = False, scan_layers: bool = False) -> Decoder:
    """Loads a transformers checkpoint folder (config.json + safetensors) into a `Decoder`.

    dtype is the compute dtype; param_dtype defaults to it; remat recomputes each block's
    activations in the backward pass (long sequences); scan_layers stacks the blocks and
    scans them (host memory then peaks near one stacked parameter). With `mesh` (and logical-axis
    `rules`), every tensor is placed straight onto its shards. A missing or unexpected tensor,
    a shape mismatch or NaN/inf values raise one ValueError naming every offending tensor.
    """
    cfg = read_config(path, dtype=dtype, param_dtype=param_dtype).replace(remat=remat, scan_layers=scan_layers)
    model, params, location = _locate(path, cfg)
    bad = []
    with contextlib.ExitStack() as files:
        handles = {file: files.enter_context(_safe_open(file)) for file in set(location.values())}
        for ppath, var in params.items():
            names, transpose, stacked = hf_tensors(ppath, cfg)
            sources = [(name, handles[location[name]]) for name in names]
            bad += _load_param(var, sources, transpose, stacked, cfg.param_dtype, mesh, rules)
    if bad:
        raise ValueError(f"Checkpoint {path} has tensors of the wrong shape or with NaN/inf values: {bad}.")
    return model


def _load_param(var, sources, transpose: bool, stacked: bool, dtype, mesh, rules) -> list[str]:
    """Reads one parameter's tensors [(name, open file)] into `var` (stacking layers when
    `stacked`, placing it on its shards with a mesh); returns the tensors of the wrong shape
    or with non-finite values."""
    from bridge import sharding  # local: sharding imports models for abstract shapes

    want = tuple(var.shape)[1:] if stacked else tuple(var.shape)
    want = want[::-1] if transpose else want
    pieces, bad = [], []
    for name, f in sources:
        tensor = f.get_tensor(name)
        if tuple(tensor.shape) != want:
            bad.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {want}")
            continue
        if not bool(jnp.isfinite(tensor).all()):
            bad.append(f"{name}: NaN/inf values")
            continue
        pieces.append((tensor.T if transpose else tensor).astype(dtype))
    if bad:
        return bad
    tensor = jnp.stack(pieces) if stacked else pieces[0]
    del pieces
    if mesh is not None:
        tensor = jax.device_put(tensor, sharding.param_sharding(var, mesh, rules))
    var.set_value(tensor)
    return []


def save_hf(model: Decoder, out_dir: str, *, tokenizer=None, max_shard_bytes: int = 4 << 30) -> None:
    """Writes config.json, generation_config.json and safetensors (sharded with an index when
    larger than `max_shard_bytes`) that `transformers.AutoModelForCausalLM` loads."""
    cfg = model.config
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if isinstance(gen["eos_token_id"], tuple):
        gen["eos_token_id"] = list(gen["eos_token_id"])
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    shards: list[dict[str, np.ndarray]] = [{}]  # host arrays: an export runs no device program
    size = total = 0
    for p, var in iter_params(model):
        names, transpose, stacked = hf_tensors(p, cfg)
        value = np.asarray(jax.device_get(var[...]))
        for i, name in enumerate(names):
            tensor = value[i] if stacked else value
            tensor = np.ascontiguousarray(tensor.T if transpose else tensor)
            nbytes = tensor.size * tensor.dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
            total += nbytes
    for stale in os.listdir(out_dir):
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
