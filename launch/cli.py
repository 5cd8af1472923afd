"""Shared launcher plumbing: one line and a non-zero exit for every user error, no traceback."""

import contextlib
import json
import os
import re
import sys

from absl import flags


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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
    `--config.*` override each end in one line naming the file, variant or key (exit 2)."""
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
def user_errors():
    """ValueError/FileNotFoundError/CheckpointError/NonFiniteError -> one line, exit 2."""
    from bridge.checkpoint import CheckpointError
    from bridge.runtime import NonFiniteError

    try:
        yield
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteError, TypeError) as error:
        fail(str(error))


def format_summary(summary: dict) -> str:
    return json.dumps(summary, indent=2, default=str)
