"""Runs one experiment's pipeline from its config.

    python -m launch.train --config=configs/sparse_to_dense/toy.py:smoke --workdir=/tmp/run \
        --config.seed=3 --config.stages.opd.steps=100

Resumes from the workdir's checkpoints when it has any. User errors (unknown config key,
bad variant, mismatched checkpoint or tokenizer) print one message and exit 2.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from bridge import pipelines

    if not _WORKDIR.value:
        cli.fail("--workdir is required.")
    with cli.user_errors():
        summary = pipelines.run(_CONFIG.value, _WORKDIR.value)
    print(cli.format_summary(summary))


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
