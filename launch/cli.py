"""Shared launcher plumbing: clean messages for user errors instead of tracebacks."""

import contextlib
import json
import re
import sys

from absl import flags


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl's parser, but an unknown or bad --config.* override names the key and exits 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # config_flags raises AttributeError/KeyError/ValueError inside parsing
        text = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        key = re.findall(r"'([^']+)'", text)
        where = f" (overrides given: {', '.join(overrides)})" if overrides else ""
        config_error = any(a.startswith("--config.") for a in argv[1:]) and key
        fail(f"unknown or invalid config key {key[0]!r}: {text}{where}" if config_error else
             f"bad command line: {text}")


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
