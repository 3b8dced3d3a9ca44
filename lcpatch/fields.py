"""Field checks shared by every recipe section, so that all errors read the same way."""

from __future__ import annotations

from typing import Any

from .errors import RecipeError

AUTO = "auto"


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(section: str, name: str, value: Any, *, minimum: int | None = None, allow_auto: bool = False) -> None:
    """Accept an int (not a bool) at or above `minimum`, or 'auto' where allowed."""
    if allow_auto and value == AUTO:
        return
    accepted = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    if allow_auto:
        accepted += " or 'auto'"
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"{section}.{name} must be {accepted}; got {_describe(value)}.")
    if minimum is not None and value < minimum:
        raise RecipeError(f"{section}.{name} must be {accepted}; got {value}.")


def check_number(
    section: str, name: str, value: Any, *, greater_than: float | None = None, allow_auto: bool = False
) -> None:
    """Accept an int or float (not a bool) strictly above `greater_than`, or 'auto' where allowed."""
    if allow_auto and value == AUTO:
        return
    accepted = "a number" + (f" > {greater_than}" if greater_than is not None else "")
    if allow_auto:
        accepted += " or 'auto'"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{section}.{name} must be {accepted}; got {_describe(value)}.")
    if greater_than is not None and not value > greater_than:
        raise RecipeError(f"{section}.{name} must be {accepted}; got {value}.")


def check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Accept one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise RecipeError(f"{section}.{name} must be one of {', '.join(choices)}; got {_describe(value)}.")


def check_keys(section: str, given: dict, accepted: tuple[str, ...]) -> None:
    """Reject keys that the section does not define (typos must not be ignored)."""
    unknown = [key for key in given if key not in accepted]
    if unknown:
        raise RecipeError(f"unknown field {section}.{unknown[0]}; {section} accepts: {', '.join(accepted)}.")


def check_str(section: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    """Accept a non-empty string, or None where allowed."""
    if allow_none and value is None:
        return
    if not isinstance(value, str) or not value:
        accepted = "a non-empty string" + (" or null" if allow_none else "")
        raise RecipeError(f"{section}.{name} must be {accepted}; got {_describe(value)}.")


def check_bool(section: str, name: str, value: Any) -> None:
    """Accept true or false."""
    if not isinstance(value, bool):
        raise RecipeError(f"{section}.{name} must be true or false; got {_describe(value)}.")
