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

Step checker (`check_steps`, for step-aligned critiques): the steps are the scratchpad's worked
steps (when there is one) and then the answer's digits from the least significant, the order
column addition produces them. For addition the failing digit's step is its column,
"a_i+b_i+c_i=t" (c_i the true incoming carry; the last column is the final carry, "0+0+c=c"),
so the critique names the column and the carry the attempt got wrong; for multiplication it is
"i=d" (digit i from the right should be d). A malformed answer fails at its first digit.
Privileged contexts are symbolic (`Task.context_style`) in the characters of a prompt, so the
toy tokenizer "char:0123456789+=" reads them: the teacher reads "<context>=<prompt>", with "="
between a context's fields too (SDPO's "14128=0=14118": the attempt, its verdict, a correct
peer).

Hard splits: more `digits` than a model was trained on (the bridge toy's 4-digit SFT student
scores 0.000 avg@8 and pass@8 on 5 digits), or `min_carries` > 0, which keeps only addition
problems with at least that many carries (long carry chains; same length and format as the plain
task), for train and test alike. Carries are not what that student finds hard: it scores 0.50
greedy at min_carries 0, 2, 3 and 4 alike (measured).

Reading contexts (`context_prompts` > 0, `bridge.tasks.base.with_context_prompts`): that
fraction of train prompts carry a context; with `context_digits`, half of those are instead
`context_digits`-digit problems whose context holds the whole answer (their pairs avoid the test
pairs and the first `num_train` train pairs of the `context_digits` task of the same seed and
`num_test`), so an SFT base learns to
copy an answer from a context at the hard split's length without learning to solve it;
`plain_last` train examples at the end stay plain (an SFT stopping rule's held-out check).

Splits: the test pairs are drawn first (from `seed`), then train pairs from a separate stream
skipping every test pair in either operand order, so the splits are disjoint by construction, the
test set does not depend on `num_train`, and train sets of one seed are prefixes of each other
(a large `num_train` for SFT contains the small RL prompt set).
"""

from __future__ import annotations

import numpy as np

from bridge.tasks.base import Example, RewardResult, StepCheck, Task, with_context_prompts

ALPHABET = "0123456789+*=:,"
OPS = ("+", "*")


def answer_width(digits: int, op: str) -> int:
    return digits + 1 if op == "+" else 2 * digits


def format_answer(a: int, b: int, digits: int, op: str) -> str:
    value = a + b if op == "+" else a * b
    return str(value).zfill(answer_width(digits, op))


def addition_columns(a: int, b: int, digits: int) -> tuple[list[str], int]:
    """Column additions from the least significant digit, "da+db+carry=total" each, and the
    carry out of the last column."""
    steps, carry = [], 0
    for i in range(digits):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        total = da + db + carry
        steps.append(f"{da}+{db}+{carry}={total}")
        carry = total // 10
    return steps, carry


def worked_steps(a: int, b: int, digits: int, op: str) -> str:
    """The worked steps before ":" (see the module docstring)."""
    if op == "+":
        return ",".join(addition_columns(a, b, digits)[0])
    return "+".join(str(a * ((b // 10**i) % 10) * 10**i) for i in range(digits))


def carries(a: int, b: int, digits: int) -> int:
    """How many of the `digits` columns of a + b carry into the next column."""
    count, carry = 0, 0
    for i in range(digits):
        carry = ((a // 10**i) % 10 + (b // 10**i) % 10 + carry) // 10
        count += carry
    return count


def _draw_pairs(rng: np.random.Generator, count: int, digits: int, exclude: set, min_carries: int = 0) -> list:
    pairs, seen, drawn = [], set(exclude), 0
    high = 10**digits
    while len(pairs) < count:
        if min_carries and drawn > 1000 * (count + 100):
            raise ValueError(f"arithmetic: could not draw {count} distinct {digits}-digit additions with at least "
                             f"{min_carries} carries; lower num_train / num_test or min_carries.")
        draw = rng.integers(0, high, size=(max(64, 2 * (count - len(pairs))), 2))
        drawn += len(draw)
        for a, b in draw.tolist():
            key = (min(a, b), max(a, b))
            if key not in seen and (not min_carries or carries(a, b, digits) >= min_carries):
                seen.add(key)
                pairs.append((a, b))
                if len(pairs) == count:
                    break
    return pairs


def make_examples(
    split: str, *, digits: int, op: str, scratchpad_steps: bool, num_train: int, num_test: int, seed: int,
    min_carries: int = 0,
) -> list[Example]:
    unordered = (10**digits) * (10**digits + 1) // 2
    if num_train + num_test > unordered // 2:
        raise ValueError(
            f"arithmetic: num_train + num_test = {num_train + num_test} is more than half of the "
            f"{unordered} distinct {digits}-digit operand pairs; lower them or raise digits."
        )
    stream = [seed, 2, min_carries] if min_carries else [seed]  # the plain task's splits stay as they were
    test = _draw_pairs(np.random.default_rng([*stream, 0]), num_test, digits, set(), min_carries)
    if split == "test":
        pairs = test
    else:
        test_keys = {(min(a, b), max(a, b)) for a, b in test}
        pairs = _draw_pairs(np.random.default_rng([*stream, 1]), num_train, digits, test_keys, min_carries)
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


def _answer_part(text: str, op: str, scratchpad_steps: bool) -> tuple[list[str], str]:
    """(listed worked steps, answer) of a completion ([] steps without a scratchpad)."""
    text = text.strip()
    if not scratchpad_steps:
        return [], text
    steps, _, answer = text.rpartition(":")
    return [s for s in steps.split("," if op == "+" else "+") if s], answer.strip()


def column_steps(a: int, b: int, digits: int, op: str) -> list[str]:
    """The answer's digits from the least significant as steps (see the module docstring)."""
    answer = format_answer(a, b, digits, op)
    if op == "*":
        return [f"{i}={d}" for i, d in enumerate(reversed(answer))]
    out, carry = addition_columns(a, b, digits)
    return out + [f"0+0+{carry}={carry}"]


def make_step_checker(*, digits: int, op: str, scratchpad_steps: bool):
    """(completion_text, example) -> StepCheck: the first failing worked step or answer digit."""
    width = answer_width(digits, op)

    def check(completion_text: str, example: Example) -> StepCheck:
        a, b = example.meta["a"], example.meta["b"]
        listed, answer = _answer_part(completion_text, op, scratchpad_steps)
        worked = worked_steps(a, b, digits, op).split("," if op == "+" else "+") if scratchpad_steps else []
        columns = column_steps(a, b, digits, op)
        total = len(worked) + width
        for k, step in enumerate(worked):
            if k >= len(listed) or listed[k] != step:
                got = listed[k] if k < len(listed) else "nothing"
                return StepCheck(k, total, step, f"worked step {k + 1} should be {step}, not {got}.")
        truth = example.answer[::-1]
        got = answer[::-1] if len(answer) == width else ""
        for i in range(width):
            if i >= len(got) or got[i] != truth[i]:
                where = f"digit {i + 1} from the right"
                what = (f"column {i + 1} from the right is {columns[i]}, so the digit is {truth[i]}"
                        if op == "+" else f"the digit is {truth[i]}")
                seen = f"got {got[i]!r}" if got else f"the answer {answer!r} is not {width} digits"
                return StepCheck(len(worked) + i, total, columns[i], f"{where} is wrong ({seen}): {what}.")
        return StepCheck(-1, total)

    return check


def arithmetic_task(
    digits: int = 4,
    op: str = "+",
    scratchpad: bool = False,
    num_train: int = 512,
    num_test: int = 1000,
    seed: int = 0,
    chat: bool = False,
    min_carries: int = 0,
    context_prompts: float = 0.0,
    context_digits: int = 0,
    plain_last: int = 0,
) -> Task:
    """The "arithmetic" task (see the module docstring for formats and split construction)."""
    if op not in OPS:
        raise ValueError(f"arithmetic: op must be one of {OPS}, got {op!r}.")
    if digits < 1:
        raise ValueError(f"arithmetic: digits must be >= 1, got {digits}.")
    if min_carries and (op != "+" or not 0 < min_carries <= digits):
        raise ValueError(f"arithmetic: min_carries needs op '+' and 1 <= min_carries <= digits ({digits}), "
                         f"got {min_carries} with op {op!r}.")
    options = dict(digits=digits, op=op, scratchpad_steps=scratchpad)
    steps_len = len(worked_steps(10**digits - 1, 10**digits - 1, digits, op)) + 1
    task = Task(
        name="arithmetic",
        load_split=lambda split: make_examples(
            split, num_train=num_train, num_test=num_test, seed=seed, min_carries=min_carries, **options
        ),
        reward_fn=make_reward(**options),
        chat=chat,
        max_answer_tokens=answer_width(digits, op) + 1 + (steps_len if scratchpad else 0),
        stop_strings=("\n",),
        step_checker=make_step_checker(**options),
        context_style="text" if chat else "symbolic",
        context_separator="=",
    )
    if not context_prompts:
        return task
    answers = None
    if context_digits:  # the same seed and test count: its train pairs avoid that task's test pairs,
        # and its first num_train (an RL stage's prompts at that length) are not shown
        answers = arithmetic_task(context_digits, op, scratchpad, 2 * num_train, num_test, seed, chat)
    return with_context_prompts(task, context_prompts, seed, answer_task=answers, plain_last=plain_last)
