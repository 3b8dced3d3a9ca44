"""Λ attention on a patched model: per-layer rules, key bookkeeping, and backend dispatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..cache import LambdaCache, LambdaCacheLayer, RingLambdaCache
from ..errors import CacheError
from ..kernels.specs import LambdaSpec, StepInfo
from ..models import ModelStructure
from .backends import select_backend

if TYPE_CHECKING:  # the method configs import this module to build their runtime
    from .lm_infinite import LMInfinite, StreamingLLM


def layer_specs(structure: ModelStructure, method: LMInfinite | StreamingLLM) -> list[LambdaSpec]:
    """One Λ rule per layer. A layer whose own sliding window is narrower than the Λ window keeps
    it, without global tokens, so that such layers (Gemma3's local ones) behave as trained."""
    spec = method.spec()
    return [
        spec if window is None or window >= spec.window else LambdaSpec(0, window, spec.max_distance)
        for window in structure.sliding_windows
    ]


class LambdaAttention:
    """The runtime half of LM-Infinite / StreamingLLM for one model: its cache and its attention."""

    cache_class = LambdaCache

    def __init__(self, structure: ModelStructure, method: LMInfinite | StreamingLLM):
        self.structure = structure
        self.backend = method.backend
        self.specs = layer_specs(structure, method)
        select_backend(self.backend, next(structure.model.parameters()).device)  # fail at apply, not mid-run

    def make_cache(self) -> LambdaCache:
        return LambdaCache(self.specs)

    fast_decode_problem = None  # every layer has a RingLambdaCache layer

    def make_decode_cache(self) -> RingLambdaCache:
        """The same bounded cache with static shapes, for the fast decode path (`lcpatch.generation.fast_decode`)."""
        backend = select_backend(self.backend, next(self.structure.model.parameters()).device)
        return RingLambdaCache(self.specs, self.structure.rotaries, backend.rotate_stored, backend.write_ring_token)

    def cache_sizes(self) -> list[int]:
        return [spec.cache_size for spec in self.specs]

    def attend(self, module, query, key, value, step: StepInfo, cache, scaling: float, dropout: float, **kwargs):
        layer = module.layer_idx
        cache_layer = cache.layers[layer] if isinstance(cache, LambdaCache) else None
        return lambda_layer_attention(
            layer,
            query,
            key,
            value,
            step,
            cache_layer,
            self.specs[layer],
            self.structure.rotaries[layer],
            scaling,
            self.backend,
            kwargs.get("softcap"),
            dropout,
        )


def key_metadata(layer: int, key: torch.Tensor, step: StepInfo, cache_layer: LambdaCacheLayer | None):
    """Positions, validity, whether slots are in stream order and where stored-rotated keys begin, for the
    keys a layer received: from its LambdaCacheLayer, or this pass's own."""
    if cache_layer is not None and cache_layer.key_step is step and cache_layer.key_positions.shape[1] == key.shape[2]:
        c = cache_layer
        return c.key_positions, c.key_valid, c.keys_in_stream_order, c.rotated_from
    if key.shape[2] == step.positions.shape[1]:
        return step.positions, step.valid, True, None
    raise CacheError(
        f"layer {layer} received {key.shape[2]} keys for {step.positions.shape[1]} queries from a cache lcpatch "
        "does not manage; Λ attention needs the positions of every cached key. Let the patched model create its cache."
    )


def lambda_layer_attention(
    layer: int,
    query,
    key,
    value,
    step: StepInfo,
    cache_layer: LambdaCacheLayer | None,
    spec: LambdaSpec,
    rotary,
    scaling: float,
    backend: str,
    softcap: float | None,
    dropout: float,
) -> torch.Tensor:
    """One layer's Λ attention on the chosen backend (Triton kernels or the PyTorch reference)."""
    key_positions, key_valid, ordered, rotated_from = key_metadata(layer, key, step, cache_layer)
    args = (query, key, value, step.positions, key_positions, key_valid, spec, rotary, scaling)
    run = select_backend(backend, query.device).lambda_attention
    return run(*args, softcap=softcap, dropout=dropout, keys_in_stream_order=ordered, rotated_from=rotated_from)
