"""What a patched model tells tools about how long it can read: `config.max_position_embeddings`.

transformers reads it while generating (the default `max_length` is capped at it, and past it comes the warning
"exceeded the model's predefined maximum length"); other tools cut or size their input by it. `apply` sets it on
the model's config, per recipe (`advertised_length`), and `remove` restores the config exactly.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .attention import Dense
from .fields import AUTO

if TYPE_CHECKING:
    from .models import ModelStructure
    from .patching import PatchLog
    from .recipe import Recipe

# "No limit": far beyond any prompt whose keys fit in memory, yet an ordinary int wherever tools take it: in a
# JSON config, in int32 tensors and sums (2**31 - 1 has no room for `+ 1`), in RoPE code that compares lengths
# with it (unlike tokenizers' 1e30, which no tensor holds).
UNBOUNDED_CONTEXT = 2**30


def advertised_length(recipe: Recipe, training_length: int) -> int | None:
    """The context length a model patched with `recipe` (autos resolved) advertises; None: the model's own.

    - lm-infinite, streaming-llm, infllm: `UNBOUNDED_CONTEXT`. Every query attends to a bounded set of keys at
      rotary distances the model was trained on, so no length is out of range; memory is the limit (Λ caches
      are bounded, InfLLM's memory blocks grow, in CPU memory if need be).
    - dense attention with a factor scaling of RoPE (linear, dynamic, yarn, llama3, longrope; e2llm with a fixed
      g): factor × the training length, the length the scaling stretches the trained positions to.
    - dense attention with e2llm's auto g: `UNBOUNDED_CONTEXT`, since g grows with each input's length.
    - dense attention with the model's own RoPE or a new base θ (no length stated): None, the config untouched.
    """
    if not isinstance(recipe.attention, Dense):
        return UNBOUNDED_CONTEXT
    factor = getattr(recipe.rope, "factor", None)
    if factor is None:
        return None
    if factor == AUTO:
        return UNBOUNDED_CONTEXT
    return round(float(factor) * training_length)


_ABSENT = object()


class AdvertisedLength:
    """The config values that make a patched model advertise `length`.

    `max_position_embeddings` becomes `length`. `original_max_position_embeddings`, where the config has none,
    becomes the training length: transformers' name for the pretraining length of an extended model (Phi-3,
    YaRN configs), which is where lcpatch itself (`training_length`) and other tools then find it. The config
    object may be shared by other models (`type(model)(model.config)`); they see the values too while this
    model is patched.

    The model's own rotary embedding keeps reading its own values: a dynamic-NTK rotary recomputes its
    frequencies from `config.max_position_embeddings` as inputs grow, so it gets a copy of the config as it was.
    """

    def __init__(self, structure: ModelStructure, length: int):
        self._rotary = structure.rotary_emb
        configs = {
            id(c): c for c in (structure.model.config, structure.config) if hasattr(c, "max_position_embeddings")
        }
        self._changes: list[tuple[Any, str, Any, Any]] = []  # (config, name, advertised value, own value)
        for config in configs.values():
            values = {"max_position_embeddings": length}
            if not hasattr(config, "original_max_position_embeddings"):
                values["original_max_position_embeddings"] = structure.training_length
            self._changes += [(config, name, value, getattr(config, name, _ABSENT)) for name, value in values.items()]

    def install(self, log: PatchLog) -> None:
        own = self._rotary.__dict__.get("config")
        if any(own is config for config, *_ in self._changes):
            log.set_instance_attr(self._rotary, "config", copy.deepcopy(own))
        self._put(advertised=True)
        log.on_undo(lambda: self._put(advertised=False))

    @contextlib.contextmanager
    def withheld(self) -> Iterator[None]:
        """The model's own values while the block runs (so that `save_pretrained` writes its own config)."""
        self._put(advertised=False)
        try:
            yield
        finally:
            self._put(advertised=True)

    def _put(self, advertised: bool) -> None:
        for config, name, value, original in self._changes:
            value = value if advertised else original
            if value is _ABSENT:
                delattr(config, name)
            else:
                setattr(config, name, value)
