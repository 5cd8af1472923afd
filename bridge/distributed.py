"""Multi-host runs: one process per host, one global mesh over every host's devices.

    distributed.set_memory_fraction(cfg.system.memory_fraction)   # before the backend starts
    distributed.initialize()            # before any other JAX call; a no-op for one process

Where the processes come from (first match wins):
  * explicit arguments (launch flags `--coordinator_address`, `--num_processes`, `--process_id`);
  * environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
  * a cluster JAX detects by itself: a SLURM job step with more than one task (`srun`), a
    Cloud TPU pod slice (more than one worker in `TPU_WORKER_HOSTNAMES`), an Open MPI job
    (`mpirun`); `jax.distributed.initialize()` then reads everything from the environment.
Otherwise the run is one process and nothing is initialized.

How a run divides the work (simple and correct rather than clever):
  * every process reads the *global* prompt batch (`Context.prompts`) and calls the sampler on
    it: sampling is one SPMD program over the global mesh, so every process holds the same
    rollouts; `to_host` gathers a sharded result onto every host (a collective), and the
    verifier then scores the whole batch on each host, identically;
  * `global_array` builds a global array from the rows this process's devices hold
    (`jax.make_array_from_process_local_data`), used by `runtime.place_batch`;
  * orbax checkpoints are saved and restored by every process (each writes its own shards);
  * every other file (metrics, TensorBoard, DONE markers, results, Hugging Face exports,
    artifacts, the workdir lock and config) is written by process 0 only, and the processes
    meet at a `barrier` after such writes, so all of them then see the same workdir;
  * logging, progress bars and printed summaries come from process 0 only.

The workdir must be one shared folder (NFS, a GCS bucket through gcsfuse, Lustre): every
process reads the markers process 0 writes, and orbax's multi-host checkpoints need it.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


MEMORY_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def set_memory_fraction(fraction: float) -> None:
    """Has JAX preallocate `fraction` of each GPU's memory (config `system.memory_fraction`) by
    setting XLA_PYTHON_CLIENT_MEM_FRACTION, which the GPU client reads when the backend starts:
    the launchers call it before `initialize` and any computation. 0 keeps JAX's default (0.75);
    an XLA_PYTHON_CLIENT_MEM_FRACTION already in the environment wins. CPU and TPU ignore it."""
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"system.memory_fraction must be in [0, 1] (0: JAX's default); got {fraction:g}.")
    if not fraction or MEMORY_FRACTION in os.environ:
        return
    os.environ[MEMORY_FRACTION] = f"{fraction:g}"
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        logging.warning("%s=%g was set after the JAX backend started; it applies to the next process only.",
                        MEMORY_FRACTION, fraction)


def _cluster_detected() -> str | None:
    """The cluster kind `jax.distributed.initialize()` can configure itself for, when this
    process is one of several there; None for a single process."""
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1:
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "ompi"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts JAX's distributed runtime when this run has several processes; returns whether
    it did (False: one process, nothing to do). Call it before any other JAX computation.
    Arguments left None come from the environment (see the module docstring). Calling it again
    after it started is a no-op returning True."""
    from jax._src import distributed as jax_distributed

    if jax_distributed.global_state.client is not None:
        return True
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    for key, var in _ENV.items():
        if explicit[key] is None and os.environ.get(var):
            explicit[key] = os.environ[var] if key == "coordinator_address" else int(os.environ[var])
    if explicit["num_processes"] is not None and int(explicit["num_processes"]) <= 1:
        return False  # one process asked for explicitly
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing and _cluster_detected() is None:
            raise ValueError(f"A multi-process run needs --coordinator_address, --num_processes and --process_id "
                             f"(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: "
                             f"{', '.join(missing)}.")
        jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})
        return True
    if _cluster_detected() is None:
        return False
    jax.distributed.initialize()
    return True


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    """Whether this process writes the run's files and prints (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """Device arrays -> NumPy arrays with their global values, on every process. An array
    sharded over other hosts' devices is gathered (a collective: every process must call this
    at the same point); fully addressable or replicated arrays are copied locally."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def global_array(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from `value`, the array's full (global) value, which every process holds
    identically: each process passes only the rows its own devices hold to
    `jax.make_array_from_process_local_data` (the whole value where the batch axis is not
    split across processes)."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    rows = _local_rows(sharding, value.shape)
    return jax.make_array_from_process_local_data(sharding, value[rows], value.shape)


def _local_rows(sharding, shape) -> slice:
    """The contiguous block of leading-axis rows this process's devices hold (all rows when
    they do not form one block)."""
    if not shape:
        return slice(None)
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        first = index[0] if index else slice(None)
        start, stop, _ = first.indices(shape[0])
        starts.append(start)
        stops.append(stop)
    low, high = min(starts), max(stops)
    covered = np.zeros(shape[0], bool)
    for a, b in zip(starts, stops):
        covered[a:b] = True
    if not covered[low:high].all():
        return slice(None)
    return slice(low, high)
