"""The cache base class whose layers need the positions of the tokens they store."""

from __future__ import annotations

from transformers.cache_utils import Cache

from ..kernels.specs import StepInfo


class StepAwareCache(Cache):
    """A Cache whose layers need the positions of the tokens they store (set by the runtime each forward)."""

    step: StepInfo | None = None
