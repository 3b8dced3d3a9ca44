"""Data tooling shared by the training methods: documents in, training rows out."""

from .batched_generation import JsonlShards, generate_batched
from .documents import load_texts

__all__ = ["JsonlShards", "generate_batched", "load_texts"]
