"""KV caches for patched models."""

from .block_memory import BlockMemoryCache, BlockMemoryLayer
from .lambda_cache import LambdaCache, LambdaCacheLayer
from .ring import RingLambdaCache, RingLambdaCacheLayer
from .step import StepAwareCache

__all__ = [
    "BlockMemoryCache",
    "BlockMemoryLayer",
    "LambdaCache",
    "LambdaCacheLayer",
    "RingLambdaCache",
    "RingLambdaCacheLayer",
    "StepAwareCache",
]
