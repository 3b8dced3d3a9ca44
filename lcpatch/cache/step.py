"""Cache base classes: the one whose layers need the positions of the tokens they store, and what the fast
decode path (`lcpatch.generation.fast_decode`) needs of a cache."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..kernels.specs import StepInfo


class StepAwareCache(Cache):
    """A Cache whose layers need the positions of the tokens they store (set by the runtime each forward)."""

    step: StepInfo | None = None

    # A compiled decode step (`generation.compile`) runs the cache's writes eagerly, between its compiled
    # graphs: they keep host-side counts (ints that change every token) that dynamo would guard on and
    # recompile for; on a GPU the writes go to lcpatch's own kernels anyway.
    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class FixedShapeDecoding:
    """A cache whose single-token steps keep every tensor's shape and address, so that one captured CUDA
    graph can replay them (`lcpatch.generation.captured_step.DecodeStep`).

    `layout_version` changes whenever a tensor that a step reads is allocated anew (the step is then
    captured again). Work that must run on the host between tokens goes in `begin_decode_step`, which
    the step runner calls before every token, outside the graph.
    """

    decode_step = None  # set by lcpatch.generation.fast_decode: the runner of this cache's decode steps
    # Also set there, where the step is compiled: what the chunked prefill streams the prompt through
    # (None: the model's decoder as it is).
    prefill_forward = None
    layout_version = 0

    def begin_decode_step(self, valid: torch.Tensor) -> None:
        """Host-side work due before the next token ((B, 1) `valid`: which rows hold a real one); none here."""

    def end_decode_step(self) -> None:
        """Called after the token, whether its step ran or failed."""

    def capture_blocker(self) -> str | None:
        """Why this cache's steps cannot be captured as a CUDA graph now (None: they can)."""
        return None
