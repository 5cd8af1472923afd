"""Reproduces a family's paper table: every row for every seed, stages shared across rows run
once per seed, each row evaluated the same way, mean ± std over seeds.

    python -m launch.reproduce --config=configs/sparse_to_dense/toy.py [--seeds=0,1,2] [--rows=bridge,direct_grpo]
    python -m launch.reproduce --config=configs/sparse_to_dense/toy.py:smoke --workdir=/tmp/r --outdir=/tmp/r/results

Resumable: the same command continues where it stopped (runs in <workdir>/seed<k>/<run>/, as
`launch.train` writes them; evaluations cached in <workdir>/evals/). Writes <outdir>/table.md,
results.json and plots/, prints the table, and with --readme replaces the README's
<!-- reproduce:<family> --> section with it (--report_only: from the committed results.json, no
runs). The rows, seeds and evaluation are the config
module's `reproduction(variant)` (see bridge/reproduce/__init__.py).
"""

import importlib.util
import os
import sys

from absl import app, flags, logging

from launch import cli

_CONFIG = flags.DEFINE_string("config", None, "Family config: configs/<family>/<name>.py[:variant].")
_SEEDS = flags.DEFINE_list("seeds", [], "Seeds (default: the family's reproduction() seeds).")
_ROWS = flags.DEFINE_list("rows", [], "Rows to run (default: all of the family's table).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Runs and evaluation cache (default runs/reproduce/<family>).")
_OUTDIR = flags.DEFINE_string("outdir", None, "Table, JSON and plots (default results/<family>).")
_README = flags.DEFINE_string("readme", None, "A README whose <!-- reproduce:<family> --> section gets the table.")
_PROGRESS = flags.DEFINE_bool("progress", True, "A progress bar per stage.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rewrite the table, plots (and --readme) from "
                                 "<outdir>/results.json without running or evaluating anything.")


def load_module(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"reproduce_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if not _CONFIG.value:
        cli.fail("--config is required.")
    path, _, variant = _CONFIG.value.partition(":")
    family = os.path.basename(os.path.dirname(os.path.abspath(path)))
    workdir = _WORKDIR.value or os.path.join("runs", "reproduce", family)
    outdir = _OUTDIR.value or os.path.join("results", family)
    with cli.user_errors(workdir):
        from bridge import distributed, reproduce
        from bridge.reproduce import report

        if _REPORT_ONLY.value:
            table = report.write(report.load(outdir), outdir)
        else:
            module = load_module(path)
            distributed.set_memory_fraction(module.get_config(variant or None).system.memory_fraction)
            table = reproduce.reproduce(module, [p for p in variant.split(",") if p], family,
                                        seeds=_SEEDS.value, row_names=_ROWS.value, workdir=workdir, outdir=outdir,
                                        progress=_PROGRESS.value)
        if _README.value:
            with open(_README.value) as f:
                text = f.read()
            with open(_README.value, "w") as f:
                f.write(report.replace_section(text, family, table))
    print(table)
    print(f"table, results.json and plots: {outdir}")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.parse_flags))
