"""The Task protocol: examples, prompt ids, a verifiable reward, guidance and privileged context.

A task is one `Task` value (no subclassing): its behaviour comes from the functions it holds.
Task modules (arithmetic, countdown, math) build one with their own example generator/loader
and reward function; `bridge.tasks.get_task(name, **options)` picks one by name.

Privileged context is what a self-distillation teacher sees and the student does not
(`bridge.stages.self_distill`), one of `CONTEXT_MODES`:
  "opsd"      the reference solution (On-Policy Self-Distillation); needs `Example.solution`;
  "sdpo"      the verifier's verdict on the student's own attempt, plus a successful attempt of
              the same group when there is one (Self-Distillation Policy Optimization,
              "Reinforcement learning via self-distillation": the implicit feedback of scalar
              rewards);
  "hint"      a hindsight hint from the failure: the reference solution up to and including
              the first character where the failed attempt departs from it; needs `solution`;
  "critique"  a step-aligned critique: the task's `step_checker` names the attempt's first
              failing step and what it should be; needs a `step_checker`.
A correct attempt gets no hint or critique (""). `context_style` renders the context as English
("text") or, for character-level toy tokenizers, in the task's own symbols ("symbolic"); the
teacher's prompt is the context, `context_separator`, then the plain prompt (raw text), or the
user turn followed by the context (chat).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Messages = list[dict[str, str]]
SPLITS = ("train", "test")
CONTEXT_MODES = ("opsd", "sdpo", "hint", "critique")
CONTEXT_STYLES = ("text", "symbolic")


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem.

    id: stable, unique within the task (e.g. "test/000123").
    prompt: raw text (base/toy models) or chat messages [{"role": ..., "content": ...}].
    answer: the reference final answer the verifier compares against.
    solution: a reference solution (worked steps ending in the answer) or, for synthetic tasks,
      the exact target completion text used for SFT; None when the data set has none.
    meta: task-specific data the verifier needs (e.g. countdown numbers and target).
    """

    id: str
    prompt: str | Messages
    answer: str
    solution: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Verifier output for one completion.

    score: in [0, 1] (1 = correct).
    format_ok: the completion had the expected answer format (a parsable final answer).
    extracted_answer: the final answer read from the completion, None when none was found.
    info: extra fields; always holds "truncated" (the completion was cut at max length, so a stage
      may apply overlong shaping, e.g. `soft_overlong_penalty`).
    """

    score: float
    format_ok: bool
    extracted_answer: str | None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


RewardFn = Callable[[str, Example], RewardResult]


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """A task's step-by-step check of one completion.

    step: 0-based index of the first failing step, -1 when every step checks.
    steps: how many steps the reference solution has.
    expected: the failing step as it should be, in the task's symbols ("" when none fails).
    message: the same in English ("" when none fails).
    """

    step: int
    steps: int
    expected: str = ""
    message: str = ""


StepChecker = Callable[[str, Example], StepCheck]


@dataclasses.dataclass(frozen=True)
class Attempt:
    """The student's completion a context may refer to: its text (cut at the stop strings),
    the verifier's result, and a successful completion of the same group ("" when none)."""

    text: str
    result: RewardResult
    peer: str = ""


class MissingContextError(ValueError):
    """A task cannot supply the privileged context a stage asks for."""


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A verifiable task.

    name: registry name.
    load_split: split name ("train" | "test") -> examples; called once per split, then cached.
    reward_fn: (completion_text, example) -> RewardResult.
    chat: render prompts with the tokenizer's chat template (chat models) instead of raw text.
    system_prompt: prepended as a system message in chat mode (None: no system message).
    enable_thinking: passed to the chat template (Qwen3 hybrid models: thinking on or off);
      None leaves the template's default.
    max_answer_tokens: a hint for max_new_tokens when sampling this task.
    stop_strings: text at which a completion ends for scoring (besides the eos token).
    step_checker: (completion_text, example) -> StepCheck, for step-aligned critiques; None
      when the task cannot check steps.
    context_style: "text" (English) or "symbolic" (the task's own symbols) privileged contexts.
    context_separator: between the context and a raw-text prompt in the teacher's prompt (and
      between the fields of a symbolic context).
    """

    name: str
    load_split: Callable[[str], Sequence[Example]]
    reward_fn: RewardFn
    chat: bool = False
    system_prompt: str | None = None
    enable_thinking: bool | None = None
    max_answer_tokens: int = 512
    stop_strings: tuple[str, ...] = ()
    step_checker: StepChecker | None = None
    context_style: str = "text"
    context_separator: str = "\n\n"
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def examples(self, split: str) -> Sequence[Example]:
        if split not in SPLITS:
            raise ValueError(f"Task {self.name!r}: unknown split {split!r}; use one of {SPLITS}.")
        if split not in self._cache:
            self._cache[split] = tuple(self.load_split(split))
        return self._cache[split]

    def messages(self, example: Example) -> Messages:
        """Chat messages for `example` (a text prompt becomes one user turn)."""
        if isinstance(example.prompt, str):
            messages = [{"role": "user", "content": example.prompt}]
        else:
            messages = list(example.prompt)
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def prompt_text(self, example: Example) -> str:
        """The raw-template prompt text (message contents joined by newlines for chat data)."""
        if isinstance(example.prompt, str):
            return example.prompt
        return "\n".join(m["content"] for m in example.prompt)

    def prompt_ids(self, example: Example, tokenizer) -> list[int]:
        """Prompt token ids: chat template (with generation prompt) if `chat`, else raw text."""
        if self.chat:
            extra = {} if self.enable_thinking is None else {"enable_thinking": bool(self.enable_thinking)}
            ids = tokenizer.apply_chat_template(
                self.messages(example), add_generation_prompt=True, tokenize=True, **extra
            )
            if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # transformers>=5 BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in tokenizer.encode(self.prompt_text(example), add_special_tokens=False)]

    def cut_at_stop(self, completion_text: str) -> str:
        """The completion up to (not including) the first stop string."""
        for stop in self.stop_strings:
            index = completion_text.find(stop)
            if index >= 0:
                completion_text = completion_text[:index]
        return completion_text

    def reward(self, completion_text: str, example: Example, *, truncated: bool = False) -> RewardResult:
        """Score one completion; `truncated` marks a completion cut at the length limit."""
        result = self.reward_fn(self.cut_at_stop(completion_text), example)
        return dataclasses.replace(result, info={**result.info, "truncated": bool(truncated)})

    def guidance(self, example: Example, fraction: float) -> str:
        """The first `fraction` of the reference solution (characters, cut at a whitespace when one
        is near), for adaptive guidance on problems the policy never solves. "" without a solution.
        """
        solution = example.solution or ""
        if fraction <= 0 or not solution:
            return ""
        if fraction >= 1:
            return solution
        cut = int(round(len(solution) * fraction))
        space = solution.rfind(" ", 0, cut + 1)
        if space > 0 and cut - space <= 16:
            cut = space + 1
        return solution[:cut]

    def privileged_context(self, example: Example, mode: str = "opsd", attempt: Attempt | None = None) -> str:
        """Text only the self-distillation teacher sees (see the module docstring for the modes).
        "opsd" falls back to the final answer when the example has no solution; the stages
        require solutions (`check_context`). "" when a hint or critique has nothing to say
        (a correct attempt)."""
        symbolic = self.context_style == "symbolic"
        if mode == "opsd":
            if example.solution:
                return example.solution if symbolic else f"Reference solution:\n{example.solution}"
            return example.answer if symbolic else (f"Reference answer: {example.answer}" if example.answer else "")
        if attempt is None:
            raise ValueError(f"Task {self.name!r}: the {mode!r} context is about an attempt; pass attempt=.")
        if mode == "sdpo":
            return self._feedback(attempt)
        if attempt.result.score >= 1.0:
            return ""
        if mode == "hint":
            hint = hindsight_hint(attempt.text, example.solution or "")
            return hint if symbolic else f"Hint: the solution begins {hint!r}."
        if mode == "critique":
            if self.step_checker is None:
                raise MissingContextError(f"Task {self.name!r} has no step_checker; the 'critique' context needs one.")
            check = self.step_checker(attempt.text, example)
            if check.step < 0:
                return ""
            return check.expected if symbolic else f"Feedback: {check.message}"
        raise ValueError(f"Unknown privileged context mode {mode!r}; choose one of {CONTEXT_MODES}.")

    def _feedback(self, attempt: Attempt) -> str:
        """SDPO's context: the verdict on the attempt's answer, and a correct peer attempt."""
        answer, ok = attempt.result.extracted_answer or "", attempt.result.score >= 1.0
        if self.context_style == "symbolic":
            return self.context_separator.join([answer, str(int(ok))] + ([attempt.peer] if attempt.peer else []))
        verdict = (f"the answer {answer} is {'correct' if ok else 'incorrect'}." if answer
                   else "no final answer could be read from it.")
        text = f"Feedback on a previous attempt: {verdict}"
        if attempt.peer:
            text += f"\n\nA correct solution from another attempt:\n{attempt.peer}"
        return text

    def check_context(self, mode: str, examples: Sequence[Example]) -> None:
        """Stops (MissingContextError, naming the task and the missing field) when the task
        cannot supply `mode` for `examples`: "opsd" and "hint" need every example's `solution`,
        "critique" a `step_checker`; "sdpo" needs only the verifier."""
        if mode not in CONTEXT_MODES:
            raise ValueError(f"Unknown privileged context mode {mode!r}; choose one of {CONTEXT_MODES}.")
        if mode in ("opsd", "hint"):
            missing = [e.id for e in examples if not e.solution]
            if missing:
                raise MissingContextError(
                    f"Task {self.name!r} cannot supply the {mode!r} context: {len(missing)} of {len(examples)} "
                    f"examples have no reference solution (Example.solution), e.g. {missing[0]!r}.")
        if mode == "critique" and self.step_checker is None:
            raise MissingContextError(f"Task {self.name!r} cannot supply the 'critique' context: it has no "
                                      "step_checker (Task.step_checker) to find the first failing step.")

    def teacher_example(self, example: Example, context: str) -> Example:
        """`example` with `context` in its prompt, as the self-distillation teacher reads it:
        context + `context_separator` + prompt (raw text), or appended to the last user turn
        (chat). No context: the example itself."""
        if not context:
            return example
        if isinstance(example.prompt, str) and not self.chat:
            return dataclasses.replace(example, prompt=context + self.context_separator + example.prompt)
        messages = self.messages(example)
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last] = {**messages[last], "content": messages[last]["content"] + "\n\n" + context}
        return dataclasses.replace(example, prompt=messages)


def with_context_prompts(task: Task, fraction: float, seed: int = 0, *, answer_task: Task | None = None,
                         plain_last: int = 0) -> Task:
    """`task` whose train prompts carry, with probability `fraction` each, a privileged context
    of a mode drawn uniformly from those the task supplies, about a synthetic failed attempt
    (the solution with one digit changed; for "sdpo" a correct peer half of the time), so a
    small model trained on it (SFT on the solutions) learns to read contexts as a pretrained
    model does before self-distillation. Test prompts stay plain.

    answer_task: half of the context prompts are instead one of `answer_task`'s last train
      examples (as many as `task` has; e.g. longer problems than `task`'s) with a context that
      holds its whole solution ("opsd", or "sdpo" with a correct peer), so the model learns to
      read an answer from a context at that task's lengths without being taught to solve its
      problems (every other context's target needs the skill).
    plain_last: the last this-many train examples stay plain (an SFT stopping rule's held-out
      check, `check_prompts`, then measures the plain skill)."""
    modes = [m for m in CONTEXT_MODES if m != "critique" or task.step_checker is not None]

    def load_split(split: str) -> list[Example]:
        examples = list(task.load_split(split))
        if split != "train":
            return examples
        answers = list(answer_task.examples("train"))[-len(examples):] if answer_task is not None else []
        rng = np.random.default_rng([seed, 3])
        out = []
        for i, e in enumerate(examples):
            digits = [k for k, ch in enumerate(e.solution or "") if ch.isdigit()]
            if rng.random() >= fraction or not digits or i >= len(examples) - plain_last:
                out.append(e)
                continue
            if answers and rng.random() < 0.5:
                out.append(_answer_in_context(answer_task, answers[i], rng))
                continue
            k = digits[rng.integers(len(digits))]
            text = e.solution[:k] + str((int(e.solution[k]) + rng.integers(1, 10)) % 10) + e.solution[k + 1:]
            attempt = Attempt(text, task.reward(text, e), e.solution if rng.random() < 0.5 else "")
            out.append(task.teacher_example(e, task.privileged_context(e, modes[rng.integers(len(modes))], attempt)))
        return out

    return dataclasses.replace(task, load_split=load_split, _cache={})


def _answer_in_context(task: Task, e: Example, rng: np.random.Generator) -> Example:
    """`e` with a context holding its whole solution: "opsd", or "sdpo" about a failed attempt
    (one digit changed) with the solution as the correct peer."""
    if rng.random() < 0.5:
        return task.teacher_example(e, task.privileged_context(e, "opsd"))
    digits = [k for k, ch in enumerate(e.solution) if ch.isdigit()]
    k = digits[rng.integers(len(digits))]
    text = e.solution[:k] + str((int(e.solution[k]) + rng.integers(1, 10)) % 10) + e.solution[k + 1:]
    return task.teacher_example(e, task.privileged_context(e, "sdpo", Attempt(text, task.reward(text, e), e.solution)))


def hindsight_hint(attempt: str, solution: str) -> str:
    """The reference solution up to and including the first character where `attempt` departs
    from it (the whole solution when the attempt is a longer or equal string)."""
    k = 0
    while k < min(len(attempt), len(solution)) and attempt[k] == solution[k]:
        k += 1
    return solution[:k + 1]


def soft_overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), a value in [-1, 0] to add to the score:

    0                                  if L <= L_max - L_cache
    ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
    -1                                 if L > L_max
    """
    if length <= max_length - buffer:
        return 0.0
    if length <= max_length:
        return ((max_length - buffer) - length) / buffer
    return -1.0
