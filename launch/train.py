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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from bridge import pipelines, runtime

    if not _WORKDIR.value:
        cli.fail("--workdir is required.")
    started = time.perf_counter()
    with cli.user_errors(_WORKDIR.value), runtime.workdir_lock(_WORKDIR.value, _ALLOW_CHANGED.value):
        summary = pipelines.run(_CONFIG.value, _WORKDIR.value)
    print(cli.format_summary(summary, _CONFIG.value, _WORKDIR.value, time.perf_counter() - started))


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
