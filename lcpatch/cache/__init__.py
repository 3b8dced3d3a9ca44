"""KV caches for patched models."""

from .block_memory import BlockMemoryCache, BlockMemoryLayer
from .lambda_cache import LambdaCache, LambdaCacheLayer
from .ring import RingLambdaCache, RingLambdaCacheLayer
from .step import FixedShapeDecoding, StepAwareCache

__all__ = [
    "BlockMemoryCache",
    "BlockMemoryLayer",
    "FixedShapeDecoding",
    "LambdaCache",
    "LambdaCacheLayer",
    "RingLambdaCache",
    "RingLambdaCacheLayer",
    "StepAwareCache",
]
