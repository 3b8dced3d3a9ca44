"""KV caches for patched models."""

from .lambda_cache import LambdaCache, LambdaCacheLayer
from .step import StepAwareCache, StepInfo

__all__ = ["LambdaCache", "LambdaCacheLayer", "StepAwareCache", "StepInfo"]
