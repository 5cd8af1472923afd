"""Test session setup: 8 fake CPU devices, f32 matmuls, before jax is imported anywhere.

Tolerance policy (f32 throughout tests): elementwise objectives 1e-5 relative; model logits
against transformers 1e-4 max abs; sharded vs single-device 1e-5.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk, so launcher subprocesses in tests do not recompile.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"bridge-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # shared helpers: `import hf_fixtures`
