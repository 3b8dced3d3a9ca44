"""Data tooling shared by the training methods: documents in, training rows out."""

from .documents import load_texts
from .generation import JsonlShards, generate_batched

__all__ = ["JsonlShards", "generate_batched", "load_texts"]
