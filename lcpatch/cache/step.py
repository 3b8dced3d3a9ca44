"""What a patched forward pass knows about its new tokens, shared by the runtime, caches and attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


@dataclass
class StepInfo:
    """Positions (B, L) and validity (B, L) of the tokens of the forward pass in progress."""

    positions: torch.Tensor
    valid: torch.Tensor


class StepAwareCache(Cache):
    """A Cache whose layers need the positions of the tokens they store (set by the runtime each forward)."""

    step: StepInfo | None = None
