"""Multi-digit arithmetic: the toy verifiable task ("arithmetic").

Prompt "1234+5678=", answer the result zero-padded to a fixed width, most significant digit
first ("06912": digits + 1 characters for "+", 2 * digits for "*"). Operands are uniform in
[0, 10^digits), written zero-padded to `digits` characters, so every prompt and answer of a task
has the same length. Difficulty knob: `digits` (and `op`).

Completion format (the SFT target, `Example.solution`):
  scratchpad=False: the answer, e.g. "06912".
  scratchpad=True:  worked steps, ":", the answer. Addition lists the column sums from the least
    significant digit with the incoming carry, "4+8+0=12,3+7+1=11,2+6+1=9,1+5+0=6:06912";
    multiplication lists the shifted partial products, "9872+86380+740400+6170000:07006652".
Reward: exact match (0/1) of the answer part of the completion cut at the first newline (the
runner cuts at eos); with a scratchpad the answer part is the text after the last ":".

Splits: the test pairs are drawn first (from `seed`), then train pairs from a separate stream
skipping every test pair in either operand order, so the splits are disjoint by construction, the
test set does not depend on `num_train`, and train sets of one seed are prefixes of each other
(a large `num_train` for SFT contains the small RL prompt set).
"""

from __future__ import annotations

import numpy as np

from bridge.tasks.base import Example, RewardResult, Task

ALPHABET = "0123456789+*=:,"
OPS = ("+", "*")


def answer_width(digits: int, op: str) -> int:
    return digits + 1 if op == "+" else 2 * digits


def format_answer(a: int, b: int, digits: int, op: str) -> str:
    value = a + b if op == "+" else a * b
    return str(value).zfill(answer_width(digits, op))


def worked_steps(a: int, b: int, digits: int, op: str) -> str:
    """The worked steps before ":" (see the module docstring)."""
    if op == "+":
        steps, carry = [], 0
        for i in range(digits):
            da, db = (a // 10**i) % 10, (b // 10**i) % 10
            total = da + db + carry
            steps.append(f"{da}+{db}+{carry}={total}")
            carry = total // 10
        return ",".join(steps)
    return "+".join(str(a * ((b // 10**i) % 10) * 10**i) for i in range(digits))


def _draw_pairs(rng: np.random.Generator, count: int, digits: int, exclude: set) -> list:
    pairs, seen = [], set(exclude)
    high = 10**digits
    while len(pairs) < count:
        draw = rng.integers(0, high, size=(max(64, 2 * (count - len(pairs))), 2))
        for a, b in draw.tolist():
            key = (min(a, b), max(a, b))
            if key not in seen:
                seen.add(key)
                pairs.append((a, b))
                if len(pairs) == count:
                    break
    return pairs


def make_examples(
    split: str, *, digits: int, op: str, scratchpad_steps: bool, num_train: int, num_test: int, seed: int
) -> list[Example]:
    unordered = (10**digits) * (10**digits + 1) // 2
    if num_train + num_test > unordered // 2:
        raise ValueError(
            f"arithmetic: num_train + num_test = {num_train + num_test} is more than half of the "
            f"{unordered} distinct {digits}-digit operand pairs; lower them or raise digits."
        )
    test = _draw_pairs(np.random.default_rng([seed, 0]), num_test, digits, set())
    if split == "test":
        pairs = test
    else:
        test_keys = {(min(a, b), max(a, b)) for a, b in test}
        pairs = _draw_pairs(np.random.default_rng([seed, 1]), num_train, digits, test_keys)
    examples = []
    for index, (a, b) in enumerate(pairs):
        answer = format_answer(a, b, digits, op)
        solution = f"{worked_steps(a, b, digits, op)}:{answer}" if scratchpad_steps else answer
        examples.append(
            Example(
                id=f"{split}/{index:06d}",
                prompt=f"{a:0{digits}d}{op}{b:0{digits}d}=",
                answer=answer,
                solution=solution,
                meta={"a": a, "b": b},
            )
        )
    return examples


def make_reward(*, digits: int, op: str, scratchpad_steps: bool):
    width = answer_width(digits, op)

    def reward(completion_text: str, example: Example) -> RewardResult:
        text = completion_text.strip()
        if scratchpad_steps:
            has_sep = ":" in text
            answer = text.rsplit(":", 1)[1].strip() if has_sep else None
        else:
            answer = text
        if answer is None:
            return RewardResult(0.0, False, None)
        format_ok = len(answer) == width and answer.isascii() and answer.isdigit()
        return RewardResult(float(answer == example.answer), format_ok, answer)

    return reward


def arithmetic_task(
    digits: int = 4,
    op: str = "+",
    scratchpad: bool = False,
    num_train: int = 512,
    num_test: int = 1000,
    seed: int = 0,
    chat: bool = False,
) -> Task:
    """The "arithmetic" task (see the module docstring for formats and split construction)."""
    if op not in OPS:
        raise ValueError(f"arithmetic: op must be one of {OPS}, got {op!r}.")
    if digits < 1:
        raise ValueError(f"arithmetic: digits must be >= 1, got {digits}.")
    options = dict(digits=digits, op=op, scratchpad_steps=scratchpad)
    steps_len = len(worked_steps(10**digits - 1, 10**digits - 1, digits, op)) + 1
    return Task(
        name="arithmetic",
        load_split=lambda split: make_examples(
            split, num_train=num_train, num_test=num_test, seed=seed, **options
        ),
        reward_fn=make_reward(**options),
        chat=chat,
        max_answer_tokens=answer_width(digits, op) + 1 + (steps_len if scratchpad else 0),
        stop_strings=("\n",),
    )
