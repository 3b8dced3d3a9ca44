"""KV caches for patched models."""

from .lambda_cache import LambdaCache, LambdaCacheLayer, StepInfo

__all__ = ["LambdaCache", "LambdaCacheLayer", "StepInfo"]
