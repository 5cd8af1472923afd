"""Sharded Hugging Face I/O: `load_hf` builds every parameter on its shards, reading only each
distinct device block of the safetensors files; `save_hf` writes tensor by tensor from the
shards (gathering across processes per tensor), compiling nothing but a layer slice for
stacked parameters. References: the 1-device load, the files themselves (read by safetensors'
torch reader) and transformers. CPU devices report no memory_stats, so peak memory is checked
through the reads (load) and tracemalloc (export)."""

import logging
import math
import os
import socket
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from safetensors.torch import load_file

import hf_fixtures
from bridge import mesh as mesh_lib, models, sharding
from bridge.models import hf_io

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _checkpoint(path, dtype=torch.float32, family="qwen3", **overrides):
    """A 3-layer random transformers checkpoint in `path`, saved in `dtype`; the torch model."""
    model = hf_fixtures.tiny_hf_model(path, family, num_hidden_layers=3, **overrides)
    if dtype != torch.float32:
        model.to(dtype).save_pretrained(str(path))
    return model


def _file_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files, read by safetensors itself."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def _params(model) -> dict[tuple, jax.Array]:
    return {p: v[...] for p, v in hf_io.iter_params(model)}


def _by_tensor(model) -> dict[str, tuple[tuple, np.ndarray]]:
    """transformers tensor name -> (parameter path, its value in the transformers layout)."""
    out = {}
    for p, value in _params(model).items():
        names, transpose, stacked = hf_io.hf_tensors(p, model.config)
        value = np.asarray(value)
        for i, name in enumerate(names):
            tensor = value[i] if stacked else value
            out[name] = (p, tensor.T if transpose else tensor)
    return out


def _bits(x) -> np.ndarray:
    """The raw bits of a bf16 array (torch or NumPy) as int16."""
    return x.view(torch.int16).numpy() if isinstance(x, torch.Tensor) else np.asarray(x).view(np.int16)


@pytest.fixture
def reads(monkeypatch):
    """Every `hf_io.read_slice` call: (tensor name, what it returned)."""
    calls = []
    read = hf_io.read_slice

    def recorded(tensor, index):
        value = read(tensor, index)
        calls.append((tensor.name, value))
        return value

    monkeypatch.setattr(hf_io, "read_slice", recorded)
    return calls


def _check_reads(calls, model):
    """No full copy anywhere: every read is one tensor's slice of one device shard (never
    more), one read per distinct block (replicas share it), so each tensor's bytes are read
    exactly once in all."""
    params = _params(model)
    for name, (p, tensor) in _by_tensor(model).items():
        value = params[p]
        shard = value.sharding.shard_shape(value.shape)
        per_tensor = math.prod(shard[1:] if model.config.scan_layers and p[0] == "layers" else shard)
        blocks = {tuple(s.indices(n) for s, n in zip(idx, value.shape))
                  for idx in value.sharding.devices_indices_map(value.shape).values()}
        mine = [v for n, v in calls if n == name]
        assert len(mine) == len(blocks), name
        assert all(v.size == per_tensor for v in mine), (name, [v.shape for v in mine], shard)
        assert sum(v.nbytes for v in mine) == tensor.nbytes, name
    assert {n for n, _ in calls} == set(_by_tensor(model))


@pytest.mark.parametrize("shape,scan_layers", [((1, 4, 2), True), ((2, 2, 2), True), ((1, 1, 8), True),
                                               ((1, 8, 1), False)])
def test_sharded_load_equals_one_device_and_reads_only_shards(tmp_path, reads, shape, scan_layers):
    _checkpoint(tmp_path, tie_word_embeddings=False)
    single = _params(models.load_hf(str(tmp_path), scan_layers=scan_layers))
    reads.clear()
    mesh = mesh_lib.make_mesh(shape)
    model = models.load_hf(str(tmp_path), mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=scan_layers)
    variables = dict(hf_io.iter_params(model))
    assert set(variables) == set(single)
    for p, var in variables.items():
        value = var[...]
        assert value.sharding == sharding.param_sharding(var, mesh, sharding.DEFAULT_RULES), p
        np.testing.assert_array_equal(np.asarray(value), np.asarray(single[p]), err_msg=str(p))
    if shape == (1, 4, 2):
        assert model.layers.mlp.up_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
        assert model.lm_head[...].sharding.spec == P("fsdp", None)  # 301 does not split in 2
    _check_reads(reads, model)


def test_bf16_checkpoint_loads_bit_equal_without_f32(tmp_path, reads):
    _checkpoint(tmp_path, torch.bfloat16, tie_word_embeddings=False)
    mesh = mesh_lib.make_mesh((1, 4, 2))
    model = models.load_hf(str(tmp_path), jnp.bfloat16, mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=True)
    assert reads and all(v.dtype == jnp.bfloat16 for _, v in reads)
    files = _file_tensors(tmp_path)
    ours = _by_tensor(model)
    assert set(ours) == set(files)
    for name, (_, tensor) in ours.items():
        assert tensor.dtype == jnp.bfloat16
        np.testing.assert_array_equal(_bits(tensor), _bits(files[name]), err_msg=name)
    _check_reads(reads, model)
    models.save_hf(model, str(tmp_path / "out"))  # bf16 stays bf16, bit for bit
    exported = _file_tensors(tmp_path / "out")
    assert set(exported) == set(files)
    for name, tensor in files.items():
        assert exported[name].dtype == torch.bfloat16
        np.testing.assert_array_equal(_bits(exported[name]), _bits(tensor), err_msg=name)


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling "):
            self.messages.append(record.getMessage())


def _export(model, out, handler) -> int:
    """save_hf(model, out) with compilations logged to `handler`; the peak of host allocations."""
    logging.getLogger("jax").addHandler(handler)
    tracemalloc.start()
    try:
        with jax.log_compiles(True):
            models.save_hf(model, out, max_shard_bytes=1 << 20)  # force an index
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        logging.getLogger("jax").removeHandler(handler)


@pytest.mark.parametrize("family,scan_layers", [("qwen2", True), ("qwen3", True), ("llama", False)])
def test_sharded_export_round_trip(tmp_path, family, scan_layers):
    """Sharded model -> save_hf -> the same tensors for transformers and load_hf. The export
    compiles nothing but one layer slice per stacked-parameter shape (none on a second export,
    none for unrolled layers), and its host allocations stay below two tensors (one buffer plus
    Python; a stacked parameter is 3 tensors, the model 7 MB)."""
    torch_model = _checkpoint(tmp_path / "in", family=family, tie_word_embeddings=False, hidden_size=128,
                              intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2)
    mesh = mesh_lib.make_mesh((1, 4, 2))
    model = models.load_hf(str(tmp_path / "in"), mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=scan_layers)
    first, second = _Compiles(), _Compiles()
    _export(model, str(tmp_path / "first"), first)
    peak = _export(model, str(tmp_path / "out"), second)
    stacked = {(v.shape, v.sharding) for p, v in _params(model).items() if scan_layers and p[0] == "layers"}
    assert len(first.messages) <= len(stacked) and all("_take_layer" in m for m in first.messages), first.messages
    assert second.messages == []
    largest = max(t.nbytes for _, t in _by_tensor(model).values())
    assert peak < 2 * largest, (peak, largest)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    ref, got = torch_model.state_dict(), reloaded.state_dict()
    assert set(ref) == set(got)
    for name in ref:
        np.testing.assert_array_equal(got[name].numpy(), ref[name].numpy(), err_msg=name)
    again = _params(models.load_hf(str(tmp_path / "out"), scan_layers=scan_layers))
    for p, value in _params(model).items():
        np.testing.assert_array_equal(np.asarray(again[p]), np.asarray(value), err_msg=str(p))


_PROCESS = """
import sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from bridge import mesh as mesh_lib, models, sharding
from bridge.models import hf_io
mesh = mesh_lib.make_mesh((1, 4, 2))
model = models.load_hf(sys.argv[3], mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=True)
values = [v[...] for _, v in hf_io.iter_params(model)]
assert any(not v.is_fully_addressable and not v.is_fully_replicated for v in values)
models.save_hf(model, sys.argv[4], max_shard_bytes=50_000)
print("exported", jax.process_index())
"""


def _env() -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=4"])
    env["JAX_PLATFORMS"] = "cpu"
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return env


def test_two_processes_export_what_they_loaded(tmp_path):
    """2 processes x 4 CPU devices: a checkpoint loaded over the global mesh (parameters split
    across the processes) is exported by both; process 0's files equal the original tensors."""
    _checkpoint(tmp_path / "in", tie_word_embeddings=False)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    logs = [open(tmp_path / f"log{i}", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, f"localhost:{port}", str(i), str(tmp_path / "in"),
                               str(tmp_path / "out")], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
             for i, log in enumerate(logs)]  # output to files: a full pipe would block a collective
    try:
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0 and f"exported {i}" in out, f"process {i}:\n{out[-3000:]}"
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    want, got = _file_tensors(tmp_path / "in"), _file_tensors(tmp_path / "out")
    assert set(got) == set(want)
    for name, tensor in want.items():
        np.testing.assert_array_equal(got[name].numpy(), tensor.numpy(), err_msg=name)
