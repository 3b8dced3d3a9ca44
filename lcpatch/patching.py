"""A log of reversible changes to one model instance, undone in reverse order by `remove`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


class AttributeSettings:
    """Attribute values set through their normal setters (e.g. config fields), put back exactly by the log's undo
    (an attribute that was absent is deleted again) and, for the duration of a `with`, by `withheld()`."""

    def __init__(self, settings: list[tuple[Any, str, Any]]):
        self._settings = [(obj, name, value, getattr(obj, name, _MISSING)) for obj, name, value in settings]

    def install(self, log: PatchLog) -> None:
        self._put(new=True)
        log.on_undo(lambda: self._put(new=False))

    @contextlib.contextmanager
    def withheld(self) -> Iterator[None]:
        """The values as they were before `install`, while the block runs."""
        self._put(new=False)
        try:
            yield
        finally:
            self._put(new=True)

    def _put(self, new: bool) -> None:
        for obj, name, value, old in self._settings:
            value = value if new else old
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
