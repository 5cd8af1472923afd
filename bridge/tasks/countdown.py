"""Countdown: reach a target from given numbers with + - * / ("countdown"), a search-like task.

Prompt (raw) "3,7,25,50->82:", completion an expression such as "(50-25)*3+7" using each given
number at most once, with + - * / and parentheses (division exact over the rationals). Verified by
parsing with `ast` and evaluating a whitelist (integer literals, + - * /) with exact fractions;
nothing is `eval`-ed. Chat prompts ask for the expression inside \\boxed{}.

Generation: `num_numbers` integers uniform in [1, max_number]; the target comes from a random
expression combining all of them (each intermediate a positive integer), redrawn until it lies in
[target_min, target_max], so every problem has a solution (`Example.solution`). Difficulty knobs:
num_numbers (search width) and the target range. Uniformly random well-formed answers solve 11.8%
of problems at num_numbers=2 (max_number=25, targets 1-100), 1.3% at the defaults and 0.04% at
num_numbers=6, max_number=100, targets 100-999 (measured in tests/tasks/test_synthetic.py), so the
hard end is a sparse-reward regime. Test problems are drawn first; train skips any test problem
(same multiset of numbers and target), so the splits are disjoint.

Step checker (`check_steps`, for step-aligned critiques): the steps are the expression's
intermediate equations "x op y = v", innermost first (post-order, left to right), as the
reference solution builds its target. A step fails when it uses a number that is not available
(not given, or already used), divides by zero, or, for the last step, does not reach the
target; an unparsable expression fails at step 0. Privileged contexts are symbolic
(`Task.context_style`), in ALPHABET: the teacher reads "<context>:<prompt>" (":" between a
context's fields too).
"""

from __future__ import annotations

import ast
import fractions
import re
from collections import Counter

import numpy as np

from bridge.tasks.base import Example, RewardResult, StepCheck, Task

ALPHABET = "0123456789+-*/()=,>:"
MAX_EXPRESSION_CHARS = 256
_CHAT_PROMPT = (
    "Using the numbers {numbers}, write an arithmetic expression that equals {target}. "
    "Use + - * / and parentheses, each number at most once. "
    "Put the final expression in \\boxed{{}}."
)


def _combine(rng: np.random.Generator, numbers: list[int]) -> tuple[int, str] | None:
    """A random expression over all `numbers` with positive integer intermediates (or None)."""
    items = [(n, str(n)) for n in numbers]
    while len(items) > 1:
        i, j = rng.choice(len(items), size=2, replace=False)
        (x, ex), (y, ey) = items[i], items[j]
        if x < y:
            (x, ex), (y, ey) = (y, ey), (x, ex)
        candidates = [(x + y, f"({ex}+{ey})"), (x * y, f"{ex}*{ey}")]
        if x > y:
            candidates.append((x - y, f"({ex}-{ey})"))
        if x % y == 0 and y > 1:
            candidates.append((x // y, f"{ex}/{ey}" if ey.isdigit() else f"{ex}/({ey})"))
        value, text = candidates[rng.integers(len(candidates))]
        items = [item for k, item in enumerate(items) if k not in (i, j)] + [(value, text)]
    value, text = items[0]
    return value, _strip_outer_parens(text)


def _strip_outer_parens(text: str) -> str:
    if text.startswith("(") and text.endswith(")"):
        depth = 0
        for k, ch in enumerate(text):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0 and k < len(text) - 1:
                return text
        return text[1:-1]
    return text


def make_examples(
    split: str,
    *,
    num_numbers: int,
    max_number: int,
    target_min: int,
    target_max: int,
    num_train: int,
    num_test: int,
    seed: int,
    chat: bool,
) -> list[Example]:
    def draw(rng, count, exclude):
        problems, seen, attempts = [], set(exclude), 0
        while len(problems) < count:
            attempts += 1
            if attempts > 200 * (count + 10):
                raise ValueError(
                    f"countdown: could not draw {count} distinct problems with num_numbers={num_numbers}, "
                    f"max_number={max_number}, targets in [{target_min}, {target_max}]; widen the ranges."
                )
            numbers = rng.integers(1, max_number + 1, size=num_numbers).tolist()
            target, expression = _combine(rng, numbers)
            key = (tuple(sorted(numbers)), target)
            if target_min <= target <= target_max and key not in seen:
                seen.add(key)
                problems.append((numbers, target, expression))
        return problems

    test = draw(np.random.default_rng([seed, 0]), num_test, set())
    if split == "test":
        problems = test
    else:
        test_keys = {(tuple(sorted(n)), t) for n, t, _ in test}
        problems = draw(np.random.default_rng([seed, 1]), num_train, test_keys)
    examples = []
    for index, (numbers, target, expression) in enumerate(problems):
        if chat:
            prompt = _CHAT_PROMPT.format(numbers=numbers, target=target)
        else:
            prompt = f"{','.join(map(str, numbers))}->{target}:"
        examples.append(
            Example(
                id=f"{split}/{index:06d}",
                prompt=prompt,
                answer=str(target),
                solution=expression,
                meta={"numbers": numbers, "target": target},
            )
        )
    return examples


def _evaluate(node: ast.AST) -> fractions.Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return fractions.Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ZeroDivisionError
        return left / right
    raise ValueError(f"disallowed syntax {type(node).__name__}")


def parse_expression(text: str) -> ast.Expression | None:
    """The ast of an expression made only of integer literals, + - * / and parentheses, else None."""
    if len(text) > MAX_EXPRESSION_CHARS or not re.fullmatch(r"[\d\s+\-*/()]+", text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in ast.walk(tree):
        if not isinstance(
            node, (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
        ):
            return None
        if isinstance(node, ast.Constant) and type(node.value) is not int:
            return None
    return tree


def extract_expression(completion_text: str) -> str | None:
    """The last \\boxed{...} or <answer>...</answer> content, else the text; the left side of "="."""
    text = completion_text
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if boxed:
        text = boxed[-1]
    elif tagged:
        text = tagged[-1]
    text = text.split("=")[0].strip()
    return text or None


def countdown_reward(completion_text: str, example: Example) -> RewardResult:
    expression = extract_expression(completion_text)
    tree = parse_expression(expression) if expression else None
    if tree is None:
        return RewardResult(0.0, False, expression)
    used = Counter(node.value for node in ast.walk(tree) if isinstance(node, ast.Constant))
    if used - Counter(example.meta["numbers"]):
        return RewardResult(0.0, False, expression, {"error": "numbers not available"})
    try:
        value = _evaluate(tree)
    except (ZeroDivisionError, RecursionError):
        return RewardResult(0.0, True, expression, {"error": "division by zero"})
    return RewardResult(float(value == example.meta["target"]), True, expression)


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _fmt(value: fractions.Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def intermediate_steps(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """(node, its text) for every number and operation of `tree`, post-order."""
    out = []

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp):
            walk(node.left)
            walk(node.right)
        out.append(node)

    walk(tree)
    return out


def check_steps(completion_text: str, example: Example) -> StepCheck:
    """The first failing intermediate equation of a countdown expression (module docstring)."""
    expression = extract_expression(completion_text)
    tree = parse_expression(expression) if expression else None
    reference = parse_expression(example.solution or "")
    total = sum(isinstance(n, ast.BinOp) for n in ast.walk(reference)) if reference is not None else 0
    target = example.meta["target"]
    if tree is None:
        return StepCheck(0, total, f"->{target}", f"{expression!r} is not an expression of + - * / over integers.")
    available = Counter(example.meta["numbers"])
    values, step = {}, 0
    for node in intermediate_steps(tree):
        if isinstance(node, ast.Constant):
            if available[node.value] <= 0:
                return StepCheck(step, total, f"{node.value}>",
                                 f"step {step + 1} uses {node.value}, which is not an unused given number.")
            available[node.value] -= 1
            values[node] = fractions.Fraction(node.value)
            continue
        left, right, op = values[node.left], values[node.right], _OPS[type(node.op)]
        equation = f"{_fmt(left)}{op}{_fmt(right)}"
        if op == "/" and right == 0:
            return StepCheck(step, total, f"{equation}=", f"step {step + 1}, {equation}, divides by zero.")
        values[node] = left + right if op == "+" else left - right if op == "-" else left * right if op == "*" else left / right
        step += 1
    final = values[intermediate_steps(tree)[-1]]
    if final != target:
        last = max(step - 1, 0)
        return StepCheck(last, total, f"{_fmt(final)}>{target}",
                         f"step {last + 1} ends at {_fmt(final)}, not the target {target}.")
    return StepCheck(-1, total)


def countdown_task(
    num_numbers: int = 4,
    max_number: int = 25,
    target_min: int = 1,
    target_max: int = 100,
    num_train: int = 2048,
    num_test: int = 500,
    seed: int = 0,
    chat: bool = False,
) -> Task:
    """The "countdown" task (see the module docstring)."""
    if num_numbers < 2 or max_number < 2 or target_min > target_max:
        raise ValueError("countdown: need num_numbers >= 2, max_number >= 2, target_min <= target_max.")
    options = dict(
        num_numbers=num_numbers,
        max_number=max_number,
        target_min=target_min,
        target_max=target_max,
        num_train=num_train,
        num_test=num_test,
        seed=seed,
        chat=chat,
    )
    return Task(
        name="countdown",
        load_split=lambda split: make_examples(split, **options),
        reward_fn=countdown_reward,
        chat=chat,
        max_answer_tokens=1024 if chat else 8 * num_numbers,
        stop_strings=() if chat else ("\n",),
        step_checker=check_steps,
        context_style="text" if chat else "symbolic",
        context_separator=":",
    )
