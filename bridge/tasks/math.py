"""Math word problems (GSM8K, MATH, MATH-500, AIME): answer extraction and a hardened verifier.

`extract_answer(text)`: the last \\boxed{...} / \\fbox{...} (nested braces), else the text after
the last "####", else after the last "the answer is", else the last number; None if nothing.

A number followed only by words is that number: "72 clips", "$1,500 dollars", "5 cm^2" and
"5 \\text{ cm}" all mean the number ("25 percent" means 25%), unless a word changes the value
("5 million", "3 pi", "2 dozen"), in which case the answer is kept as written. Extraction drops
such words after "####" and "the answer is"; a \\boxed{} answer is returned as written.

`is_equivalent(predicted, reference, timeout_s=5.0)`: True when the two answers denote the same
value. Fast path in this process, no sympy: equal after normalization (spaces, $, \\left/\\right,
\\dfrac, unit words, degrees, trailing period, "x =" prefix) or equal as exact rationals
(integers, decimals, 1,000-style commas, a/b, \\frac{a}{b}, percentages, where 10% also matches
0.1). Otherwise math-verify (sympy) runs in a persistent worker process
(`bridge.tasks.verifier_pool`) under a hard deadline: a hung comparison is killed and scores
False, so no answer (huge powers, deep nesting, 10^5 characters, unbalanced braces) can stall a
training run. The deadline bounds the whole call, the wait for a free worker included: when
every worker stays busy until it passes (many threads, hostile answers), the answer scores False
without a verdict ("busy", counted in `verifier_pool.default_pool_stats()`). Answers longer than
MAX_ANSWER_CHARS are only compared as strings. Verdicts of the slow path (timeouts included) are
memoized (LRU), since RL groups repeat answers; busy results are not, so the next call checks.

Tasks ("gsm8k", "math", "math500", "aime") read local files or a prepared TFDS builder
(`bridge.tasks.loaders`); prompts append INSTRUCTION; reward 1 when the extracted answer is
equivalent to the reference; format_ok when an answer was found (\\boxed if `require_boxed`).
"""

from __future__ import annotations

import fractions
import functools
import re
from typing import Any

from bridge.tasks import loaders
from bridge.tasks.base import Example, RewardResult, Task
from bridge.tasks.verifier_pool import VerifierBusy, default_pool

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MAX_ANSWER_CHARS = 1000
_MAX_NUMBER_CHARS = 64
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_MAX_UNIT_ANSWER_CHARS = 200
_WORD_TAIL = r"[A-Za-z.'/-]*(?:\^\{?[23]\}?|[²³])?"  # rest of a word: "s", "m/s", "m^2", "ft."
# group 1: ["x ="] ["$"] number ["%"]; group 2: words (the first of 2+ characters); then dots.
_NUMBER_THEN_WORDS = re.compile(
    r"((?:[A-Za-z]\s*=\s*)?(?:\\?\$\s*)?[+-]?"
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+|\\[dt]?frac\{\d+\}\{\d+\})"
    r"(?:\s*\\?%)?)"
    rf"\s*\$?\s+([A-Za-z][A-Za-z.'/-]{_WORD_TAIL}(?:\s+[A-Za-z]{_WORD_TAIL})*)[\s.]*"
)
_VALUE_WORDS = frozenset(
    "pi sqrt root roots squared cubed factorial inf infinity infty log ln exp sin cos tan plus minus "
    "hundred hundreds thousand thousands million millions billion billions trillion trillions "
    "dozen dozens half halves third thirds quarter quarters".split()
)


def _last_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...} (the last few starts tried, so it stays linear)."""
    for match in reversed(list(_BOX.finditer(text))[-8:]):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return text[start:index].strip()
    bare = re.findall(r"\\boxed\s+([^\s${}]+)", text)
    return bare[-1] if bare else None


def _drop_unit_words(answer: str) -> str:
    """"72 clips" -> "72", "$1,500 dollars" -> "$1,500", "x = 5 cm^2" -> "x = 5", "25 percent"
    -> "25%"; any other answer (no leading number, digits or symbols among the words, a word in
    _VALUE_WORDS such as "million" or "pi") is returned unchanged."""
    if len(answer) > _MAX_UNIT_ANSWER_CHARS:
        return answer
    match = _NUMBER_THEN_WORDS.fullmatch(answer)
    if match is None:
        return answer
    number, words = match.groups()
    words = words.lower()
    if words.startswith(("percent", "per cent")):
        return number if number.endswith("%") else number + "%"
    if _VALUE_WORDS.intersection(re.findall(r"[a-z]+", words)):
        return answer
    return number


def _clean_tail(answer: str) -> str | None:
    previous = None
    while answer != previous:
        previous, answer = answer, answer.strip().lstrip(":").strip("$").rstrip(".")
    return _drop_unit_words(answer) or None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion or reference solution (see the module docstring)."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    if "####" in text:
        answer = _clean_tail(text.rsplit("####", 1)[1].split("\n")[0])
        if answer:
            return answer
    said = re.split(r"(?i)the (?:final )?answer is", text)
    if len(said) > 1:
        answer = _clean_tail(said[-1].split("\n")[0])
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """A canonical string for fast comparison and majority voting (no sympy)."""
    s = answer.strip()
    inner = _last_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
    s = inner if inner is not None else s
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),  # also a thousands separator: 1\,000
        ("\\;", " "),  # other spacing becomes a space (all spaces go below, after unit words)
        ("\\ ", " "),
        ("~", " "),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("°", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\displaystyle", ""),
    ):
        s = s.replace(old, new)
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]*\}\s*$", "", s)  # trailing units
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = _drop_unit_words(s.strip())
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    return s.rstrip(".")


def _as_number(s: str) -> tuple[fractions.Fraction, bool] | None:
    """(value, had_percent) for plain numbers, a/b, \\frac{a}{b}, n%; None otherwise."""
    percent = s.endswith("%")
    s = s[:-2] if s.endswith("\\%") else s.rstrip("%")
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    if re.fullmatch(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+", s):
        return fractions.Fraction(s.replace(",", "")), percent
    frac = re.fullmatch(r"([+-]?)\\frac\{(\d+)\}\{(\d+)\}", s) or re.fullmatch(r"([+-]?)(\d+)/(\d+)", s)
    if frac and int(frac.group(3)) != 0:
        value = fractions.Fraction(int(frac.group(2)), int(frac.group(3)))
        return (-value if frac.group(1) == "-" else value), percent
    return None


@functools.lru_cache(maxsize=65536)
def _slow_equivalent(predicted: str, reference: str, timeout_s: float) -> bool:
    """The worker's verdict (a timeout is one: False). Raises `VerifierBusy` when waiting for a
    worker left no time for a verdict; lru_cache does not memoize a raised call."""
    return bool(default_pool().check(predicted, reference, timeout_s))


def is_equivalent(predicted: str | None, reference: str | None, timeout_s: float = 5.0) -> bool:
    """True when `predicted` and `reference` denote the same answer; returns within timeout_s
    (plus scheduling slack), waiting for a verifier worker included."""
    if not predicted or not reference:
        return False
    p, r = normalize_answer(predicted), normalize_answer(reference)
    if not p or not r:
        return False
    if p == r:
        return True
    pn, rn = _as_number(p), _as_number(r)
    if pn is not None and rn is not None:
        (pv, p_percent), (rv, r_percent) = pn, rn
        if p_percent or r_percent:
            return pv == rv or pv == rv / 100 or pv / 100 == rv
        return pv == rv
    if len(predicted) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
        return False
    try:
        return _slow_equivalent(
            _drop_unit_words(predicted.strip().strip("$")),
            _drop_unit_words(reference.strip().strip("$")),
            float(timeout_s),
        )
    except VerifierBusy:  # every worker busy until the deadline: wrong for now, checked again next time
        return False


def make_math_reward(*, timeout_s: float = 5.0, require_boxed: bool = False):
    def reward(completion_text: str, example: Example) -> RewardResult:
        answer = extract_answer(completion_text)
        boxed = _last_boxed(completion_text) is not None
        format_ok = answer is not None and (boxed or not require_boxed)
        if answer is None or (require_boxed and not boxed):
            return RewardResult(0.0, format_ok, answer, {"boxed": boxed})
        return RewardResult(
            float(is_equivalent(answer, example.answer, timeout_s)), format_ok, answer, {"boxed": boxed}
        )

    return reward


def _first(record: dict[str, Any], keys: tuple[str, ...], default=None):
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return default


def gsm8k_example(record: dict[str, Any], index: int, split: str, instruction: str) -> Example:
    """GSM8K: {"question", "answer": "steps with <<calc>> notes\\n#### 72"}; a record without a
    question, or without an answer that ends in "#### <final answer>", raises ValueError."""
    question, full = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(full, str):
        raise ValueError(f"a GSM8K record needs \"question\" and \"answer\" strings (got keys {sorted(record)}, "
                         f"answer {full!r:.40}).")
    steps, sep, final = full.rpartition("####")
    answer = final.strip().replace(",", "")
    if not sep or not answer:
        raise ValueError(f"the GSM8K answer does not end in \"#### <final answer>\": {full[-60:]!r}.")
    solution = re.sub(r"<<[^>]*>>", "", steps).strip() + f"\nThe answer is \\boxed{{{answer}}}."
    return Example(
        id=f"{split}/{index:06d}",
        prompt=f"{question.strip()}\n{instruction}",
        answer=answer,
        solution=solution,
    )


def math_example(record: dict[str, Any], index: int, split: str, instruction: str) -> Example:
    """MATH / MATH-500 / AIME: {"problem"|"question", "solution"?, "answer"?, id fields?}."""
    problem = _first(record, ("problem", "Problem", "question", "Question"))
    if not isinstance(problem, str):
        raise ValueError(f"record {index} of split {split!r} has no problem text (keys: {sorted(record)}).")
    solution = _first(record, ("solution", "Solution"))
    answer = _first(record, ("answer", "Answer"))
    if answer is None and solution is not None:
        answer = extract_answer(str(solution))
    if answer is None:
        raise ValueError(
            f"record {index} of split {split!r} has neither an answer nor a solution "
            f"with a final answer (keys: {sorted(record)})."
        )
    record_id = _first(record, ("unique_id", "id", "ID"))
    return Example(
        id=f"{split}/{record_id if record_id is not None else f'{index:06d}'}",
        prompt=f"{problem.strip()}\n{instruction}",
        answer=str(answer).strip(),
        solution=None if solution is None else str(solution),
        meta={k: record[k] for k in ("level", "type", "subject", "year") if k in record},
    )


def _math_family_task(
    name: str,
    to_example,
    max_answer_tokens: int,
    *,
    train_path: str | None = None,
    test_path: str | None = None,
    tfds_name: str | None = None,
    tfds_data_dir: str | None = None,
    chat: bool = True,
    system_prompt: str | None = None,
    enable_thinking: bool | None = None,
    instruction: str = INSTRUCTION,
    limit: int | None = None,
    timeout_s: float = 5.0,
    require_boxed: bool = False,
    max_answer_tokens_override: int | None = None,
) -> Task:
    paths = {"train": train_path, "test": test_path}
    locations: dict[str, str] = {}  # example id -> "file:line" of its record (`loaders.record_location`)

    def load(split: str) -> list[Example]:
        records = loaders.load_split_records(
            split, paths=paths, tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, task=name
        )
        examples = []
        for i, (where, record) in enumerate(records[:limit]):
            try:
                examples.append(to_example(record, i, split, instruction))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
            locations.setdefault(examples[-1].id, where)
        return examples

    load.locations = locations

    return Task(
        name=name,
        load_split=load,
        reward_fn=make_math_reward(timeout_s=timeout_s, require_boxed=require_boxed),
        chat=chat,
        system_prompt=system_prompt or None,  # "" (a config's unset field): no system message
        enable_thinking=enable_thinking,
        max_answer_tokens=max_answer_tokens_override or max_answer_tokens,
    )


def gsm8k_task(**options) -> Task:
    """GSM8K (Cobbe et al. 2021). Options: train_path/test_path or tfds_name(+tfds_data_dir), chat
    (default True), system_prompt ("" or None: none), enable_thinking (None: the chat template's
    default), instruction, limit, timeout_s, require_boxed."""
    return _math_family_task("gsm8k", gsm8k_example, 1024, **options)


def math_task(**options) -> Task:
    """MATH (Hendrycks et al. 2021); same options as gsm8k."""
    return _math_family_task("math", math_example, 2048, **options)


def math500_task(**options) -> Task:
    """MATH-500 (Lightman et al. 2023 test subset); same options as gsm8k."""
    return _math_family_task("math500", math_example, 2048, **options)


def aime_task(**options) -> Task:
    """AIME 2024/2025 (integer answers 0-999); same options as gsm8k (usually only test_path)."""
    return _math_family_task("aime", math_example, 4096, **options)
