"""Before-generate hooks: what other parts of a patch do around each `generate()` call, in one fixed order.

A part registers a hook on a model instance under one of the stages in `ORDER`. Each generate() call
runs the model's hooks in that order, on generate's arguments as the caller gave them (before the
cache is made and the prompt prefilled in chunks); a hook returns a context manager that stays open
for the whole call, so per-call state it sets is cleared when generate() returns or raises.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

from ..patching import PatchLog

# Every stage, in the order its hook runs before generate().
ORDER = (
    # E2-LLM's auto g: the first chunk of the prefill must know how long the whole sequence will be.
    "e2llm-length",
)

BeforeGenerate = Callable[[tuple, dict], contextlib.AbstractContextManager]

_HOOKS: weakref.WeakKeyDictionary[Any, dict[str, BeforeGenerate]] = weakref.WeakKeyDictionary()


def register_before_generate(model, stage: str, hook: BeforeGenerate, log: PatchLog) -> None:
    """Run `hook(args, kwargs)` around every generate() call of this model, at `stage`; `log` unregisters it."""
    if stage not in ORDER:
        raise ValueError(f"unknown before-generate stage '{stage}'; the stages are {', '.join(ORDER)}")
    hooks = _HOOKS.setdefault(model, {})
    if stage in hooks:
        raise ValueError(f"a before-generate hook is already registered at stage '{stage}' on this model")
    hooks[stage] = hook
    log.on_undo(lambda: hooks.pop(stage))


def before_generate(model, args: tuple, kwargs: dict) -> contextlib.ExitStack:
    """The model's hooks entered in `ORDER` for one generate() call; they exit, in reverse, with the stack."""
    hooks = _HOOKS.get(model, {})
    stack = contextlib.ExitStack()
    with stack:  # a hook that fails on entry exits those entered before it
        for stage in ORDER:
            if stage in hooks:
                stack.enter_context(hooks[stage](args, kwargs))
        return stack.pop_all()
