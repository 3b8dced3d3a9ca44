"""Data tooling shared by the training methods: documents in, training rows out."""

from .documents import load_texts

__all__ = ["load_texts"]
