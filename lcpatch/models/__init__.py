"""Supported model families and where, in each, the decoder, RoPE and attention live."""

from .families import FAMILIES, Family, family_of
from .structure import ModelStructure, find_structure

__all__ = ["FAMILIES", "Family", "ModelStructure", "family_of", "find_structure"]
