"""Attention methods: one small validated dataclass each, filed in `ATTENTION_METHODS` under its `method` name."""

from __future__ import annotations

from ..fields import ATTENTION_METHODS

# Each module registers its methods when imported; this order is the one errors and supported_models() list.
from .dense import Dense
from .lm_infinite import LMInfinite, StreamingLLM

# isort: split
from .infllm import InfLLM

AttentionMethod = Dense | LMInfinite | StreamingLLM | InfLLM

__all__ = ["ATTENTION_METHODS", "AttentionMethod", "Dense", "InfLLM", "LMInfinite", "StreamingLLM"]
