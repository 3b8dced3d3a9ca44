"""A log of reversible changes to one model instance, undone in reverse order by `remove`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MISSING = object()


class PatchLog:
    """Every change that `apply` makes goes through here, so `remove` (or a failed `apply`) undoes it all."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set_instance_attr(self, obj: Any, name: str, value: Any) -> None:
        """Shadow `name` on this instance only (the class stays untouched)."""
        old = obj.__dict__.get(name, _MISSING)
        object.__setattr__(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                object.__delattr__(obj, name)
            else:
                object.__setattr__(obj, name, old)

        self._undo.append(undo)

    def set_property(self, obj: Any, name: str, value: Any) -> None:
        """Set an attribute through its normal setter (e.g. a config property), restoring the old value on undo."""
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    def on_undo(self, action: Callable[[], None]) -> None:
        self._undo.append(action)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
