"""Runs one experiment's pipeline from its config.

    python -m launch.train --config=configs/sparse_to_dense/toy.py:smoke --workdir=/tmp/run \
        --config.seed=3 --config.stages.opd.steps=100

Resumes from the workdir's checkpoints when it has any; one run holds a workdir at a time
(<workdir>/LOCK). A resume that changes the config is refused unless `--allow_changed` names
the changed keys (e.g. `--allow_changed=stages.student_rl.optimizer.lr` after a non-finite
stop, or `eval` for new evaluation settings): applied from the first unfinished unit and
recorded in <workdir>/history.jsonl. Every error (config, data, weights, workdir, checkpoint)
prints one line and exits 2, the traceback only with --debug; Ctrl-C exits 130 saying where
the run will resume. At the end it prints a table of the stages (accuracy, pass@k, KL to the
base, entropy, length, wall time), where the plots are, and <workdir>/results.json holds it all.

Several hosts: run the same command on every host (one process per host; `launch/tpu_pod.sh`,
`launch/slurm.sbatch`). TPU pods, SLURM and Open MPI are detected; elsewhere pass
`--coordinator_address=<host 0>:<port> --num_processes=N --process_id=i` (or the JAX_*
environment variables, see `bridge/distributed.py`). The workdir must be a folder every host
shares; process 0 writes the metrics, exports and summary.
"""

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_ALLOW_CHANGED = flags.DEFINE_list(
    "allow_changed", [], "Config keys (or prefixes, such as eval) a resumed run may change; each change "
    "applies from the first unfinished unit and is recorded in <workdir>/history.jsonl.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (default: JAX_COORDINATOR_ADDRESS, or "
    "detected on TPU pods / SLURM / Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (default: "
                                      "JAX_NUM_PROCESSES, or detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes - 1 "
                                   "(default: JAX_PROCESS_ID, or detected).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from bridge import distributed, pipelines, runtime

    if not _WORKDIR.value:
        cli.fail("--workdir is required.")
    with cli.user_errors(_WORKDIR.value):
        distributed.set_memory_fraction(_CONFIG.value.system.memory_fraction)
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    started = time.perf_counter()
    with cli.user_errors(_WORKDIR.value), runtime.workdir_lock(_WORKDIR.value, _ALLOW_CHANGED.value):
        summary = pipelines.run(_CONFIG.value, _WORKDIR.value)
    if distributed.is_main():
        print(cli.format_summary(summary, _CONFIG.value, _WORKDIR.value, time.perf_counter() - started))


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
