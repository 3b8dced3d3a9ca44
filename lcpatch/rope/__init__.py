"""The recipe's `rope` section: one small validated dataclass per scaling, looked up by `scaling` name.

Each has `resolve(training_length)` (fills `auto`) and `install(structure, dense, log)`, which
patches the model instance through the PatchLog and returns the structure whose `rotaries` the
attention method must use.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from ..errors import RecipeError
from ..fields import check_keys
from .e2llm import E2LLM
from .scaling import Base, Dynamic, Linear, Llama3, LongRope, NoScaling, Yarn

RopeScaling = NoScaling | Base | Linear | Dynamic | Yarn | Llama3 | LongRope | E2LLM

ROPE_SCALINGS: dict[str, type] = {
    cls.scaling: cls for cls in (NoScaling, Base, Linear, Dynamic, Yarn, Llama3, LongRope, E2LLM)
}


def rope_from_dict(data: Any) -> RopeScaling:
    """Build the scaling dataclass named by data['scaling'] from a recipe's `rope` section."""
    if not isinstance(data, dict):
        raise RecipeError(f"the rope section must be a mapping; got {data!r} ({type(data).__name__}).")
    scaling = data.get("scaling", "none")
    if not isinstance(scaling, str) or scaling not in ROPE_SCALINGS:
        raise RecipeError(f"unknown rope.scaling {scaling!r}; accepted: {', '.join(ROPE_SCALINGS)}.")
    cls = ROPE_SCALINGS[scaling]
    check_keys("rope", data, ("scaling", *(f.name for f in fields(cls))))
    return cls(**{k: v for k, v in data.items() if k != "scaling"})


def rope_to_dict(rope: RopeScaling) -> dict:
    return {"scaling": rope.scaling, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(rope).items()}}


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
    "rope_from_dict",
    "rope_to_dict",
]
