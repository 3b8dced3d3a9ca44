"""Attention methods: one small validated dataclass each, looked up by `method` name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ..errors import RecipeError
from ..fields import check_keys
from .infllm import InfLLM
from .lm_infinite import LMInfinite, StreamingLLM


@dataclass(frozen=True)
class Dense:
    """The model's own attention, untouched (useful with RoPE scaling alone)."""

    method: ClassVar[str] = "dense"

    def resolve(self, training_length: int) -> Dense:
        return self


AttentionMethod = Dense | LMInfinite | StreamingLLM | InfLLM

ATTENTION_METHODS: dict[str, type] = {cls.method: cls for cls in (Dense, LMInfinite, StreamingLLM, InfLLM)}


def attention_from_dict(data: Any) -> AttentionMethod:
    """Build the method dataclass named by data['method'] from a recipe's `attention` section."""
    if not isinstance(data, dict):
        raise RecipeError(f"the attention section must be a mapping; got {data!r} ({type(data).__name__}).")
    method = data.get("method", "dense")
    if not isinstance(method, str) or method not in ATTENTION_METHODS:
        raise RecipeError(f"unknown attention.method {method!r}; accepted: {', '.join(ATTENTION_METHODS)}.")
    cls = ATTENTION_METHODS[method]
    names = tuple(f.name for f in fields(cls))
    check_keys("attention", data, ("method", *names))
    return cls(**{k: v for k, v in data.items() if k != "method"})


def attention_to_dict(attention: AttentionMethod) -> dict:
    return {"method": attention.method, **asdict(attention)}


__all__ = [
    "ATTENTION_METHODS",
    "AttentionMethod",
    "Dense",
    "InfLLM",
    "LMInfinite",
    "StreamingLLM",
    "attention_from_dict",
    "attention_to_dict",
]
