"""What every recipe section is built from, so that all sections read, write and fail the same way: the field
checks, the `SectionConfig` mixin of their frozen dataclasses, and the registries that name each section's configs
(`attention.method`, `rope.scaling`, `training.method`), where a config files itself with `@registry.register(name)`
as in peft's `register_peft_method`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, ClassVar, TypeVar

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


def check_mapping(section: str, value: Any) -> None:
    """Accept a mapping of fields (what YAML gives for a section)."""
    if not isinstance(value, dict):
        raise RecipeError(f"the {section} section must be a mapping; got {_describe(value)}.")


def _plain(value: Any) -> Any:
    """A field's value as YAML writes it: sections as mappings, tuples as lists."""
    if isinstance(value, SectionConfig):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class SectionConfig:
    """Mixin of a recipe section's frozen dataclass: built from the section's mapping (every key checked, so that
    a typo fails) and written back to one. A config filed in a `Registry` reads and writes the key that names it
    (`method: lm-infinite`) too. Values are checked by the dataclass's own `__post_init__`."""

    section: ClassVar[str]  # where the fields sit in a recipe, as errors name them: "attention", "training.lora"
    registry: ClassVar[Registry | None] = None

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        check_mapping(cls.section, data)
        name_key = () if cls.registry is None else (cls.registry.key,)
        check_keys(cls.section, data, (*name_key, *(f.name for f in fields(cls))))
        return cls(**{key: value for key, value in data.items() if key not in name_key})

    def to_dict(self) -> dict:
        name = {} if self.registry is None else {self.registry.key: getattr(self, self.registry.key)}
        return {**name, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)}}


C = TypeVar("C", bound=SectionConfig)


class Registry(Mapping[str, type]):
    """The configs of one recipe section, by the name its `key` field gives (`attention.method: infllm`), in the
    order they were registered (the order errors list them in)."""

    def __init__(self, section: str, key: str, default: str | None = None):
        self.section = section
        self.key = key
        self.default = default  # the config a section without `key` gets (None: the key is required)
        self._configs: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[C]], type[C]]:
        """Class decorator: file a frozen `SectionConfig` dataclass under `name` and give it `key` = name."""

        def file(cls: type[C]) -> type[C]:
            if not (is_dataclass(cls) and issubclass(cls, SectionConfig)):
                raise TypeError(f"{cls.__name__} must be a dataclass with the SectionConfig mixin to be registered.")
            if name in self._configs:
                raise TypeError(f"{self.section}.{self.key} {name!r} is already registered ({self._configs[name]}).")
            cls.section = self.section
            cls.registry = self
            setattr(cls, self.key, name)
            self._configs[name] = cls
            return cls

        return file

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._configs)

    def __getitem__(self, name: str) -> type:
        return self._configs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._configs)

    def __len__(self) -> int:
        return len(self._configs)

    def from_dict(self, data: Any) -> SectionConfig:
        """The config that the section's mapping names by `key`, built from its other fields."""
        check_mapping(self.section, data)
        name = data.get(self.key, self.default)
        if not isinstance(name, str) or name not in self._configs:
            raise RecipeError(f"unknown {self.section}.{self.key} {name!r}; accepted: {', '.join(self._configs)}.")
        return self._configs[name].from_dict(data)


ATTENTION_METHODS = Registry("attention", key="method", default="dense")
ROPE_SCALINGS = Registry("rope", key="scaling", default="none")
TRAINING_METHODS = Registry("training", key="method")
