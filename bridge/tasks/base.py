"""The Task protocol: examples, prompt ids, a verifiable reward, guidance and privileged context.

A task is one `Task` value (no subclassing): its behaviour comes from the functions it holds.
Task modules (arithmetic, countdown, math) build one with their own example generator/loader
and reward function; `bridge.tasks.get_task(name, **options)` picks one by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

Messages = list[dict[str, str]]
SPLITS = ("train", "test")


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


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A verifiable task.

    name: registry name.
    load_split: split name ("train" | "test") -> examples; called once per split, then cached.
    reward_fn: (completion_text, example) -> RewardResult.
    chat: render prompts with the tokenizer's chat template (chat models) instead of raw text.
    system_prompt: prepended as a system message in chat mode (None: no system message).
    max_answer_tokens: a hint for max_new_tokens when sampling this task.
    stop_strings: text at which a completion ends for scoring (besides the eos token).
    """

    name: str
    load_split: Callable[[str], Sequence[Example]]
    reward_fn: RewardFn
    chat: bool = False
    system_prompt: str | None = None
    max_answer_tokens: int = 512
    stop_strings: tuple[str, ...] = ()
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
            ids = tokenizer.apply_chat_template(
                self.messages(example), add_generation_prompt=True, tokenize=True
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

    def privileged_context(self, example: Example) -> str | None:
        """Text only the self-distillation teacher sees: the reference solution (or the answer)."""
        if example.solution:
            return f"Reference solution:\n{example.solution}"
        return f"Reference answer: {example.answer}" if example.answer else None


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
