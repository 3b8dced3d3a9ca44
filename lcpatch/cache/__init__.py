"""KV caches for patched models."""

from .block_memory import BlockMemoryCache, BlockMemoryLayer
from .lambda_cache import LambdaCache, LambdaCacheLayer
from .step import StepAwareCache, StepInfo

__all__ = ["BlockMemoryCache", "BlockMemoryLayer", "LambdaCache", "LambdaCacheLayer", "StepAwareCache", "StepInfo"]
