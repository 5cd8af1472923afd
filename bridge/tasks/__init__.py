"""Verifiable tasks, chosen by name: `get_task("arithmetic", digits=4)`.

Registered: arithmetic, countdown (synthetic, toy scale); gsm8k, math, math500, aime (local files
or prepared TFDS builders).
"""

from __future__ import annotations

from typing import Callable

from bridge.tasks.arithmetic import arithmetic_task
from bridge.tasks.base import Example, RewardResult, Task, soft_overlong_penalty
from bridge.tasks.countdown import countdown_task
from bridge.tasks.math import aime_task, gsm8k_task, math500_task, math_task

_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make `get_task(name, **options)` call `factory(**options)`."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"Task {name!r} is already registered.")
    _REGISTRY[name] = factory


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **options) -> Task:
    """The task registered as `name`, built with `options` (the factory's keyword arguments)."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown task {name!r}; registered tasks: {', '.join(task_names())}.")
    try:
        return _REGISTRY[name](**options)
    except TypeError as error:
        raise TypeError(f"get_task({name!r}): bad options {sorted(options)}: {error}") from error


register_task("arithmetic", arithmetic_task)
register_task("countdown", countdown_task)
register_task("gsm8k", gsm8k_task)
register_task("math", math_task)
register_task("math500", math500_task)
register_task("aime", aime_task)

__all__ = [
    "Example",
    "RewardResult",
    "Task",
    "get_task",
    "register_task",
    "task_names",
    "soft_overlong_penalty",
]
