"""The recipe's `rope` section: one small validated dataclass per scaling, filed in `ROPE_SCALINGS` under its
`scaling` name.

Each has `resolve(training_length)` (fills `auto`) and `install(structure, dense, log)`, which
patches the model instance through the PatchLog and returns the structure whose `rotaries` the
attention method must use.
"""

from __future__ import annotations

from ..fields import ROPE_SCALINGS

# Each module registers its scalings when imported; this order is the one errors list.
from .scaling import Base, Dynamic, Linear, Llama3, LongRope, NoScaling, Yarn

# isort: split
from .e2llm import E2LLM

RopeScaling = NoScaling | Base | Linear | Dynamic | Yarn | Llama3 | LongRope | E2LLM

__all__ = [
    "ROPE_SCALINGS",
    "Base",
    "E2LLM",
    "Dynamic",
    "Linear",
    "Llama3",
    "LongRope",
    "NoScaling",
    "RopeScaling",
    "Yarn",
]
