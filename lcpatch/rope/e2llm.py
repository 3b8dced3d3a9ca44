"""E2-LLM (Liu et al., 2024, arXiv 2401.06951) at inference: RoPE sees position m / g.

A model fine-tuned with E2-LLM's augmentation (`lcpatch.training.e2llm`) reads any length by
dividing its positions by a scale g: fixed, or `auto` = ceil(input length / training length),
chosen when a sequence starts (so a prompt and its generated tokens share one g).

The model keeps its integer `position_ids` (transformers' mask code reads them to find packed
sequences); only what RoPE sees changes:
- dense attention: a forward pre-hook on the rotary embedding hands it position_ids / g
  (during training, the augmentation's (m + t) / g instead);
- Λ attention, which rotates keys itself: its per-layer `Rotary` tables get frequencies / g,
  which is the same angle, (m / g) · θ = m · (θ / g).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LcpatchError
from ..fields import AUTO, ROPE_SCALINGS, SectionConfig, check_number
from ..generation import register_before_generate
from ..kernels.specs import Rotary
from ..models.structure import ModelStructure, unwrap
from ..patching import PatchLog

_POSITIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@ROPE_SCALINGS.register("e2llm")
@dataclass(frozen=True)
class E2LLM(SectionConfig):
    """E2-LLM inference: `factor` is the scale g (a number >= 1), or auto = ceil(input length / training length)."""

    length_dependent: ClassVar[bool] = False

    factor: float | str = AUTO

    def __post_init__(self) -> None:
        check_number("rope", "factor", self.factor, greater_than=0, allow_auto=True)

    def resolve(self, training_length: int) -> E2LLM:
        return self  # auto is decided per sequence, from its length

    def install(self, structure: ModelStructure, dense: bool, log: PatchLog) -> ModelStructure:
        E2LLMPositions(structure, None if self.factor == AUTO else float(self.factor), dense).install(log)
        return structure


class E2LLMPositions:
    """The per-model state: the current g, the length expected by `generate`, and an optional training draw."""

    def __init__(self, structure: ModelStructure, fixed: float | None, dense: bool):
        self.structure = structure
        self.fixed = fixed
        self.dense = dense
        self.base_rotaries = list(structure.rotaries)
        self.g = fixed or 1.0
        self.expected_length: int | None = None
        # Set by lcpatch.training.e2llm while a model trains: maps (B, L) integer positions to RoPE positions.
        self.augmentation: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._drawn: torch.Tensor | None = None  # one draw per forward, though Gemma3 calls RoPE once per layer type

    @property
    def training_length(self) -> int:
        return self.structure.training_length

    def install(self, log: PatchLog) -> None:
        model, rotary = self.structure.model, self.structure.rotary_emb
        if not self.dense:
            self._use(self.g)
        log.on_undo(self.structure.decoder.register_forward_pre_hook(self._before_decoder).remove)
        log.on_undo(rotary.register_forward_pre_hook(self._before_rotary, with_kwargs=True).remove)
        _POSITIONS[model] = self
        log.on_undo(lambda: _POSITIONS.pop(model, None))
        if self.fixed is None:
            register_before_generate(model, "e2llm-length", self._expect_generate_length, log)

    @contextlib.contextmanager
    def _expect_generate_length(self, args: tuple, kwargs: dict) -> Iterator[None]:
        """For auto g, tell the first chunk of a generate() call how long the whole sequence will be:
        prompt + max_new_tokens when given."""
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        self.expected_length = (
            prompt.shape[-1] + (kwargs.get("max_new_tokens") or 0) if torch.is_tensor(prompt) else None
        )
        try:
            yield
        finally:
            self.expected_length = None

    def _use(self, g: float) -> None:
        self.g = g
        if not self.dense:
            self.structure.rotaries[:] = [Rotary(r.inv_freq / g, r.scale) for r in self.base_rotaries]

    def _before_decoder(self, module, args) -> None:
        self._drawn = None

    def _before_rotary(self, module, args, kwargs):
        in_kwargs = "position_ids" in kwargs
        positions = kwargs["position_ids"] if in_kwargs else args[1]
        if module.training and self.augmentation is not None:
            if self._drawn is None:
                self._drawn = self.augmentation(positions.expand(args[0].shape[0], -1))
            rope_positions = self._drawn
        else:
            if self.fixed is None and int(positions.min()) == 0:  # a new sequence starts: choose its g
                length = self.expected_length or int(positions.max()) + 1
                self._use(float(max(1, math.ceil(length / self.training_length))))
            if not self.dense or self.g == 1:
                return None
            rope_positions = positions.to(torch.float32) / self.g
        if in_kwargs:
            return args, {**kwargs, "position_ids": rope_positions}
        return (args[0], rope_positions, *args[2:]), kwargs


def e2llm_positions_of(model) -> E2LLMPositions:
    """The E2-LLM state of a model patched with rope.scaling e2llm (raises a clear error otherwise)."""
    state = _POSITIONS.get(unwrap(model))
    if state is None:
        raise LcpatchError(
            "this model is not patched with an E2-LLM recipe; call lcpatch.apply(model, recipe) with "
            "rope: {scaling: e2llm} (e.g. the built-in 'e2llm') before training or evaluating it."
        )
    return state
