"""Gather several launch.eval result folders into one paper-style markdown table.

    python -m launch.table runs/*/eval_gsm8k runs/*/eval_math --metric=avg --out=table.md \
        --kl_plot=acc_vs_kl.png

Rows are methods (results "method", set by launch.eval --method), columns benchmarks (tasks),
cells mean ± std over the seeds found. --kl_plot scatters accuracy against the KL to the
reference model for runs evaluated with --reference.
"""

import glob

from absl import app, flags

from launch import cli

flags.DEFINE_string("metric", "avg", "avg | pass | maj (at k = n) or e.g. pass@4, kl_to_reference.")
flags.DEFINE_string("out", None, "Write the markdown table here (it is always printed).")
flags.DEFINE_string("kl_plot", None, "PNG of accuracy vs KL to the reference, one point per run.")
FLAGS = flags.FLAGS


def run(patterns) -> str:
    from bridge.evaluation import report

    dirs = sorted({d for p in patterns for d in (glob.glob(p) or [p])})
    if not dirs:
        raise ValueError("Pass one or more result folders (or glob patterns).")
    table = report.gather_table(dirs, FLAGS.metric)
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(table)
    if FLAGS.kl_plot:
        points = []
        for d in dirs:
            results = report.load_results(d)
            kl = results["metrics"].get("kl_to_reference")
            if kl is not None:
                points.append(
                    (
                        f"{results.get('method')} {results['task']}",
                        kl,
                        report.metric_value(results, FLAGS.metric),
                    )
                )
        if not points:
            raise ValueError("--kl_plot: no run has kl_to_reference (evaluate with --reference).")
        report.plot_accuracy_vs_kl(points, FLAGS.kl_plot, FLAGS.metric)
    return table


def main(argv):
    with cli.user_errors():
        run(argv[1:])


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
