"""Worker process for `bridge.tasks.verifier_pool`: math-verify equivalence over stdin/stdout.

Run as a script (`python verifier_worker.py`), so it imports only math-verify and sympy, not the
bridge package or jax. Protocol, one JSON object per line: in {"p": predicted, "r": reference,
"t": seconds}, out {"ok": bool}; "ready" is printed once the imports are done. The worker exits
when its stdin closes (the parent died or shut the pool down).
"""

import json
import os
import sys

# This file sits next to bridge/tasks/math.py: keep its folder off sys.path so `import math`
# inside sympy finds the standard library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _parse(parse, text, seconds):
    return parse(text if "$" in text or "\\boxed" in text else f"${text}$", parsing_timeout=seconds)


def main() -> None:
    from math_verify import parse, verify

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        seconds = max(1, int(request["t"]))
        try:
            gold = _parse(parse, request["r"], seconds)
            answer = _parse(parse, request["p"], seconds)
            ok = bool(gold) and bool(answer) and bool(verify(gold, answer, timeout_seconds=seconds))
        except BaseException:  # noqa: BLE001  (any failure of the checker is a wrong answer)
            ok = False
        sys.stdout.write(json.dumps({"ok": ok}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
