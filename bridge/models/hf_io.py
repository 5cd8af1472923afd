"""Hugging Face checkpoints in and out: safetensors <-> NNX `Decoder`, no torch.

Parameter names follow transformers' Llama/Qwen layout. Linear kernels are stored [out, in]
there and [in, out] here, so they are transposed on the way in and out.

Loading reads each safetensors header itself (`read_header`) and memory-maps the data, so a
slice of a tensor reads only its bytes (`read_slice`; BF16 as `ml_dtypes.bfloat16`). With a
mesh every parameter is built straight on its shards (`jax.make_array_from_callback`): each
distinct block this process's devices hold is read once (replicas share it) from the slice of
the file it covers (the transposed slice for a kernel; for a stacked `scan_layers` parameter,
from each layer's own tensor), converted to the parameter dtype on the host (bf16 stays bf16,
no float32 detour) and put on its devices, so neither a device nor the host ever holds more
of a tensor than that device's shard. Without a mesh each parameter is read whole onto the
default device. The model is built abstractly (`nnx.eval_shape`) so no random init is spent.

Export (`save_hf`) writes the model's dtype tensor by tensor (a stacked parameter one layer
at a time, cut on its devices by one small compiled slice per parameter shape; no other device
program runs), each assembled on the host from the distinct device shards and written straight
to its safetensors file, so host memory stays near one tensor; a tensor sharded over several
processes is gathered alone (`process_allgather`, every process calls `save_hf`), and only
process 0 writes files.

A broken folder raises one ValueError (FileNotFoundError when a file is missing) naming the
file and, where there is one, the key, line or tensor: unreadable JSON, a config.json without
a required key, a truncated or damaged safetensors file, missing, unexpected or misshapen
tensors, and NaN/inf weights (checked in every slice as it is read). `check_hf_dir` runs every
check but the last without reading any weights, for validation before a run writes anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

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


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file: its name, dtype, shape and first byte in the file."""
    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def read_header(file: str) -> dict[str, Stored]:
    """The tensors of a safetensors file by name, from its header (8-byte little-endian length,
    then JSON {name: {dtype, shape, data_offsets}}); reads no weights. A damaged header or a
    tensor reaching past the end of the file raises one ValueError naming the file."""
    def damaged(why: str) -> ValueError:
        return ValueError(f"{file}: not a readable safetensors file, truncated or damaged ({why}).")

    size = os.path.getsize(file)
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise damaged(f"a header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise damaged(f"the header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise damaged(f"tensor {name!r} has an unreadable entry {entry!r}") from error
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize or 8 + length + end > size:
            raise damaged(f"tensor {name!r}: bytes {begin}..{end} of a {dtype} {shape} tensor, "
                          f"{size - 8 - length} bytes of data in the file")
        tensors[name] = Stored(name, file, dtype, shape, 8 + length + begin)
    return tensors


def read_slice(tensor: Stored, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index] as a new host array in the stored dtype; through a memory map, so only
    the bytes of the slice are read from disk."""
    data = np.memmap(tensor.file, dtype=tensor.dtype, mode="r", offset=tensor.offset, shape=tensor.shape)
    return np.array(data[index])


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
    """(abstract model, its parameters by path, tensor name -> `Stored`) of a checkpoint
    folder; raises ValueError naming every missing or unexpected tensor."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    params = dict(iter_params(model))
    expected = {name for p in params for name in hf_tensors(p, cfg)[0]}
    location = {}
    for file in _weight_files(path):
        location.update(read_header(file))
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
    scans them. With `mesh` (and logical-axis `rules`) every parameter is built on its shards
    (`sharding.param_sharding`), each device's shard read from disk on its own; without, on
    the default device. A missing or unexpected tensor, a shape mismatch or NaN/inf values
    raise one ValueError naming every offending tensor (on every process alike).
    """
    from bridge import sharding  # local: sharding imports models for abstract shapes

    cfg = read_config(path, dtype=dtype, param_dtype=param_dtype).replace(remat=remat, scan_layers=scan_layers)
    model, params, location = _locate(path, cfg)
    misshapen, nonfinite = {}, set()
    for ppath, var in params.items():
        names, transpose, stacked = hf_tensors(ppath, cfg)
        want = tuple(var.shape)[1:] if stacked else tuple(var.shape)
        want = want[::-1] if transpose else want
        misshapen.update({n: f"{n}: checkpoint {location[n].shape} vs model {want}"
                          for n in names if location[n].shape != want})
        if not misshapen.keys() & set(names):
            target = None if mesh is None else sharding.param_sharding(var, mesh, rules)
            var.set_value(_load_param(tuple(var.shape), [location[n] for n in names], transpose, stacked,
                                      jnp.dtype(cfg.param_dtype), target, nonfinite))
    if mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1:
        nonfinite = _on_any_process(nonfinite, sorted(location))
    bad = [misshapen.get(n) or f"{n}: NaN/inf values" for p in params for n in hf_tensors(p, cfg)[0]
           if n in misshapen or n in nonfinite]
    if bad:
        raise ValueError(f"Checkpoint {path} has tensors of the wrong shape or with NaN/inf values: {bad}.")
    return model


def _load_param(shape: tuple, sources: list[Stored], transpose: bool, stacked: bool, dtype, target,
                nonfinite: set) -> jax.Array:
    """One parameter of `shape` from its tensors (one per layer when `stacked`, each [out, in]
    when `transpose`), as a jax.Array with sharding `target` (None: the default device). Each
    distinct block this process's devices hold is read once on the host, from the slice of the
    files it covers, and converted to `dtype` there (replicas share it); the names of tensors
    with NaN/inf in a read slice are added to `nonfinite`."""
    blocks = {}

    def piece(tensor: Stored, index: tuple) -> np.ndarray:
        raw = read_slice(tensor, index[::-1] if transpose else index)
        if not np.isfinite(raw).all():
            nonfinite.add(tensor.name)
        return np.ascontiguousarray(raw.T if transpose else raw, dtype=dtype)

    def read(index: tuple) -> np.ndarray:
        if not stacked:
            return piece(sources[0], index)
        return np.stack([piece(sources[i], index[1:]) for i in range(*index[0].indices(shape[0]))])

    def block(index: tuple) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        if key not in blocks:
            blocks[key] = read(index)
        return blocks[key]

    if target is None:
        return jnp.asarray(block((slice(None),) * len(shape)))
    return jax.make_array_from_callback(shape, target, block)


def _on_any_process(names: set, every: list[str]) -> set:
    """The union over processes of each process's `names` (a collective over all processes)."""
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([n in names for n in every]))
    return {n for n, flag in zip(every, np.asarray(flags).any(axis=0)) if flag}


def save_hf(model: Decoder, out_dir: str, *, tokenizer=None, max_shard_bytes: int = 4 << 30) -> None:
    """Writes config.json, generation_config.json and safetensors (sharded with an index when
    larger than `max_shard_bytes`) that `transformers.AutoModelForCausalLM` loads, in the
    model's parameter dtype.

    Tensor by tensor (a stacked parameter one layer at a time), each assembled on the host from
    the distinct shards this process's devices hold and written straight to its file, so host
    memory stays near one tensor and no parameter is gathered on a device. No device program
    runs, except one compiled slice per stacked parameter shape (a layer of a `scan_layers`
    model). A tensor sharded over several processes is gathered with `process_allgather`, a
    collective: then every process must call `save_hf`; only process 0 (`distributed.is_main`)
    writes files.
    """
    from bridge import distributed

    cfg = model.config
    main = distributed.is_main()
    plan = []  # (transformers name, its shape, dtype, parameter value, layer or None, transposed)
    for p, var in iter_params(model):
        names, transpose, stacked = hf_tensors(p, cfg)
        value = var[...]
        shape = value.shape[1:] if stacked else value.shape
        plan += [(name, shape[::-1] if transpose else shape, np.dtype(value.dtype), value, i if stacked else None,
                  transpose) for i, name in enumerate(names)]
    files = _split_files(plan, max_shard_bytes)
    fnames = (["model.safetensors"] if len(files) == 1 else
              [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    if main:
        _write_configs(cfg, out_dir)
        if len(files) > 1:
            weight_map = {entry[0]: fname for fname, entries in zip(fnames, files) for entry in entries}
            total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype, *_ in plan)
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for fname, entries in zip(fnames, files):
        with open(os.path.join(out_dir, fname), "wb") if main else contextlib.nullcontext() as f:
            if main:
                f.write(_header(entries))
            for _, _, _, value, layer, transpose in entries:
                tensor = _hf_tensor(value, layer, transpose, main)
                if main:
                    f.write(memoryview(tensor.reshape(-1).view(np.uint8)))
                del tensor  # freed before the next one is built
    if tokenizer is not None and main:
        tokenizer.save_pretrained(out_dir)


def _write_configs(cfg: ModelConfig, out_dir: str) -> None:
    """config.json and generation_config.json; removes the safetensors of an earlier export."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if isinstance(gen["eos_token_id"], tuple):
        gen["eos_token_id"] = list(gen["eos_token_id"])
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    for stale in os.listdir(out_dir):
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, stale))


def _split_files(plan: list, max_shard_bytes: int) -> list[list]:
    """The plan's tensors in consecutive groups of at most `max_shard_bytes` (a larger tensor
    alone), one group per file, each ordered largest item first so every tensor is aligned."""
    files, size = [[]], 0
    for entry in plan:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    return [sorted(entries, key=lambda e: -e[2].itemsize) for entries in files]


def _header(entries: list) -> bytes:
    """A safetensors file's header for tensors [(name, shape, dtype, ...)] stored in that order:
    its 8-byte little-endian length, then the JSON, padded so the data start 8-byte aligned."""
    header, offset = {}, 0
    for name, shape, dtype, *_ in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


@jax.jit
def _take_layer(value: jax.Array, layer) -> jax.Array:
    """value[layer] with a traced index: one program per stacked parameter shape and sharding."""
    return jax.lax.dynamic_index_in_dim(value, layer, keepdims=False)


def _hf_tensor(value: jax.Array, layer: int | None, transpose: bool, wanted: bool) -> np.ndarray | None:
    """One transformers tensor (layer `layer` of a stacked parameter, [out, in] for a kernel) as
    a C-ordered host array, or None where not `wanted` (a process that writes nothing). Every
    process must call it for a parameter its devices do not all hold (a collective)."""
    if value.is_fully_addressable and not wanted:
        return None
    part = value if layer is None else _take_layer(value, np.int32(layer))
    if not (part.is_fully_addressable or part.is_fully_replicated):
        from jax.experimental import multihost_utils

        whole = multihost_utils.process_allgather(part, tiled=True)
        return np.ascontiguousarray(whole.T if transpose else whole) if wanted else None
    if not wanted:
        return None
    out = np.empty(part.shape[::-1] if transpose else part.shape, part.dtype)
    done = set()
    for shard in part.addressable_shards:
        index = tuple(slice(*s.indices(n)) for s, n in zip(shard.index, part.shape))
        if (key := tuple((s.start, s.stop) for s in index)) in done:
            continue  # a replica of a block already placed
        done.add(key)
        block = np.asarray(shard.data)
        if transpose:
            out[index[::-1]] = block.T
        else:
            out[index] = block
    return out
