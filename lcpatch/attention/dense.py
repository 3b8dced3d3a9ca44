"""The attention section's default: the model's own attention."""

from __future__ import annotations

from dataclasses import dataclass

from ..fields import ATTENTION_METHODS, SectionConfig


@ATTENTION_METHODS.register("dense")
@dataclass(frozen=True)
class Dense(SectionConfig):
    """The model's own attention, untouched (useful with RoPE scaling alone)."""

    def resolve(self, training_length: int) -> Dense:
        return self
