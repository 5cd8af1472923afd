"""Shared launcher plumbing: one line and a non-zero exit for every failure, the traceback only
with --debug; Ctrl-C exits 130 saying where the run will resume."""

import contextlib
import json
import os
import re
import signal
import sys
import threading

from absl import flags

_DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the full traceback instead of one line.")


def fail(message: str, code: int = 2) -> None:
    """Prints `message` as one line on stderr and exits with `code`."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print("error: " + " ".join(lines), file=sys.stderr)
    sys.exit(code)


def _exit_interrupted(message: str) -> None:
    """Prints the one line and exits 130 at once: the interpreter's teardown after an interrupt
    can crash inside XLA (a compile cut off), and by now the run has closed what it wrote."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


def _redeliver_interrupt(unraisable) -> None:
    """A Ctrl-C that lands in a garbage-collector callback (jax has one) is swallowed there
    with a traceback; deliver it again, from a thread, once the callback has returned."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
        again.daemon = True
        again.start()
    else:
        sys.__unraisablehook__(unraisable)


def _config_arg(argv) -> str | None:
    """The value of --config (either `--config=v` or `--config v`), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _last_error_line(text: str) -> str:
    """The final `SomeError: message` line of an error text that embeds a traceback."""
    lines = [line.strip() for line in text.replace("\\n", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        head, sep, rest = line.partition(": ")
        if sep and head.endswith(("Error", "Exception")) and " " not in head:
            return rest
    return lines[-1] if lines else text


def parse_flags(argv):
    """absl's parser; a missing config file, an unknown variant and an unknown or invalid
    `--config.*` override each end in one line naming the file, variant or key (exit 2). Ctrl-C
    from here until `user_errors` takes over (imports) exits 130 with one line."""
    signal.signal(signal.SIGINT, lambda *_: _exit_interrupted("interrupted at startup; nothing was run"))
    config = _config_arg(argv)
    if config is not None:
        path = config.split(":", 1)[0]
        if not os.path.isfile(path):
            fail(f"config file not found: {path}")
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # config_flags raises AttributeError/KeyError/ValueError inside parsing
        text = str(error).strip("'\"")
        if "parsing config file" in text:  # get_config(arg) raised: e.g. an unknown variant
            fail(f"{config}: {_last_error_line(text)}")
        detail = _last_error_line(text)
        for override in (a.split("=")[0][2:] for a in argv[1:] if a.startswith("--config.")):
            if override in text or any(re.search(rf"\b{re.escape(part)}\b", text)
                                       for part in override.split(".")[1:]):
                fail(f"unknown or invalid config key {override!r}: {detail}")
        fail(f"bad command line: {_last_error_line(text)}")


@contextlib.contextmanager
def user_errors(workdir: str | None = None):
    """Every failure ends in one line on stderr, the traceback only with --debug: a user's error
    (config, data, weights, workdir, checkpoint, a non-finite stop) exits 2, an unexpected one 1,
    and Ctrl-C 130, saying where running the same command resumes (from <workdir>/cursor.json)."""
    from bridge.checkpoint import CheckpointError
    from bridge.runtime import NonFiniteError, WorkdirError

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = _redeliver_interrupt
    try:
        yield
    except (KeyboardInterrupt, Exception) as error:
        if flags.FLAGS.is_parsed() and _DEBUG.value:
            raise
        if isinstance(error, KeyboardInterrupt):
            _exit_interrupted("interrupted" + (f"; {_resume_point(workdir)}" if workdir else ""))
        if isinstance(error, (ValueError, OSError, TypeError, CheckpointError, NonFiniteError, WorkdirError)):
            fail(str(error))
        fail(f"{type(error).__name__}: {error} (unexpected; --debug shows the traceback)", code=1)


def _resume_point(workdir: str) -> str:
    """Where the same command resumes: the unit named by <workdir>/cursor.json, from its last
    checkpoint."""
    cursor = os.path.join(workdir, "cursor.json")
    if not os.path.exists(cursor):
        return "no stage had started; running the same command starts the run"
    with open(cursor) as f:
        state = json.load(f)
    start = f"its checkpoint at step {state['step']}" if state["step"] else "its start"
    return f"running the same command resumes stage {state['stage']} from {start}"


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, seconds = divmod(int(round(float(seconds))), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


SUMMARY_COLUMNS = ("stage", "model", "steps", "accuracy", "pass@k", "KL to base", "entropy", "length", "wall time")


def summary_rows(summary: dict, cfg=None) -> list[dict]:
    """One row per unit of `summary["stages"]` (run order): its model slot, the step it ended
    at, the evaluation's accuracy, pass@n, KL to the base (per completion), token entropy and
    response length (blank when the unit does not export), and its wall time."""
    rows = []
    for unit, r in summary.get("stages", {}).items():
        stage = unit.split("@")[0]
        scfg = cfg.stages.get(stage) if cfg is not None and "stages" in cfg else None
        pass_key = next((k for k in r if k.startswith("pass@")), None)
        rows.append({"stage": unit, "model": scfg.get("model") if scfg is not None else None,
                     "steps": r.get("steps"), "accuracy": r.get("accuracy"), "pass@k": r.get(pass_key),
                     "pass_key": pass_key, "KL to base": r.get("kl_to_reference"), "entropy": r.get("entropy"),
                     "length": r.get("response_length"),
                     "wall time": r.get("wall_time_s", r.get("train_time_s"))})
    return rows


def format_summary(summary: dict, cfg=None, workdir: str | None = None, wall_time_s: float | None = None) -> str:
    """The run's summary as a Markdown table, one row per stage, then the pipeline's own
    numbers (e.g. the bridge's C1/C2), where the plots are and the JSON with everything
    (<workdir>/results.json)."""
    rows = summary_rows(summary, cfg)
    keys = sorted({r["pass_key"] for r in rows if r["pass_key"]})
    header = [c if c != "pass@k" or len(keys) != 1 else keys[0] for c in SUMMARY_COLUMNS]
    table = [[_cell(r[c]) if c != "wall time" else _duration(r[c]) for c in SUMMARY_COLUMNS] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    left = {"stage", "model"}

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if name in left else c.rjust(w)
                                 for c, w, name in zip(cells, widths, SUMMARY_COLUMNS)) + " |"

    out = ["", "Summary" + (f" of {workdir}" if workdir else "") +
           (f" (wall time {_duration(wall_time_s)})" if wall_time_s is not None else ""), "",
           line(header), "|" + "|".join(("-" * (w + 2)) if name in left else ("-" * (w + 1) + ":")
                                       for w, name in zip(widths, SUMMARY_COLUMNS)) + "|"]
    out += [line(t) for t in table]
    out += ["", "accuracy and pass@k: the evaluation's (config.eval) on held-out test prompts; KL to base: "
            "exact KL to the stage's base model (eval_kl_reference or eval.kl_reference), summed along "
            "each completion; entropy: mean per token; length: tokens per completion; wall time: the stage's "
            "build, steps and evaluation in this run."]
    skipped = {u: r["nonfinite_skipped_updates"] for u, r in summary.get("stages", {}).items()
               if r.get("nonfinite_skipped_updates")}
    if skipped:
        out.append("non-finite updates skipped: " + ", ".join(f"{u} {n}" for u, n in skipped.items()))
    extra = {k: v for k, v in summary.items() if k not in ("stages", "final", "plots")}
    names = {"c1_teacher_accuracy_after_rl": "C1, teacher accuracy after RL",
             "c2_teacher_student_kl_before_opd": "C2, teacher-student sampled reverse KL before OPD (nats/token)"}
    for key, value in extra.items():
        if isinstance(value, (int, float, str)) or value is None:
            out.append(f"{names.get(key, key)}: {_cell(value)}")
    plots = summary.get("plots") or []
    if plots:
        folders = sorted({os.path.dirname(p) for p in plots})
        out.append(f"plots: {', '.join(folders)} ({', '.join(os.path.basename(p) for p in plots)})")
    if workdir:
        out.append(f"everything above, per stage and more: {os.path.join(workdir, 'results.json')}")
    return "\n".join(out)
