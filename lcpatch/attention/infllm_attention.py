"""InfLLM on a patched model: per-layer rules, the block-memory cache, and attention dispatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..cache import BlockMemoryCache, BlockMemoryLayer
from ..cache.block_memory import build_plan
from ..cache.lambda_cache import LambdaCacheLayer
from ..kernels.specs import InfLLMSpec, LambdaSpec, StepInfo
from ..models import ModelStructure
from .backends import select_backend
from .infllm_decode import infllm_decode_step
from .infllm_reference import attend_execution_block, form_blocks
from .infllm_waves import infllm_attention_waves
from .lambda_attention import lambda_layer_attention

if TYPE_CHECKING:  # the method config imports this module to build its runtime
    from .infllm import InfLLM


def layer_specs(structure: ModelStructure, spec: InfLLMSpec) -> list[InfLLMSpec | LambdaSpec]:
    """InfLLM for every layer, except that a layer whose own sliding window is narrower than the
    local window keeps exactly that window (Gemma3's local layers), as trained."""
    return [
        spec if window is None or window >= spec.n_local else LambdaSpec(0, window, window)
        for window in structure.sliding_windows
    ]


class InfLLMAttention:
    """The runtime half of InfLLM for one model: its cache and its attention."""

    cache_class = BlockMemoryCache

    def __init__(self, structure: ModelStructure, method: InfLLM):
        self.structure = structure
        self.method = method
        self.spec = method.spec()
        self.specs = layer_specs(structure, self.spec)
        select_backend(method.backend, next(structure.model.parameters()).device)  # fail at apply, not mid-run

    def make_cache(self) -> BlockMemoryCache:
        """A fresh, empty block-memory cache for this model (one per batch)."""
        return BlockMemoryCache(self.spec, self.specs, self.method.offload, self.method.max_cached_blocks)

    def make_decode_cache(self) -> BlockMemoryCache:
        """The same cache, able to run single-token steps at fixed shapes (`lcpatch.generation.fast_decode`)."""
        spec, rotaries = self.spec, self.structure.rotaries

        def form(index: int, layer: BlockMemoryLayer, targets: list[int]) -> None:
            form_blocks(layer, targets, spec, rotaries[index])

        return BlockMemoryCache(spec, self.specs, self.method.offload, self.method.max_cached_blocks, form)

    @property
    def fast_decode_problem(self) -> str | None:
        """Why this model cannot take the fast decode path under infllm (None: it can)."""
        if any(isinstance(spec, LambdaSpec) for spec in self.specs):
            return "this model's sliding-window layers keep a cache that grows with each token under infllm"
        return None

    def cache_sizes(self) -> list[int]:
        """Key/value positions per layer kept on the device when memory blocks are offloaded (init + ring,
        the blocks a decode step attends, the LRU of cached blocks); with offload 'gpu' the blocks add to it."""
        blocks = self.method.max_cached_blocks + self.spec.topk
        on_device = self.spec.n_init + self.spec.ring_size + blocks * self.spec.block_size
        return [on_device if isinstance(spec, InfLLMSpec) else spec.cache_size for spec in self.specs]

    def attend(self, module, query, key, value, step: StepInfo, cache, scaling: float, dropout: float, **kwargs):
        """One layer's attention for this forward pass's tokens, storing them in the cache; (B, L, Hq, D)."""
        index = module.layer_idx
        spec, rotary, softcap = self.specs[index], self.structure.rotaries[index], kwargs.get("softcap")
        layer = cache.layers[index] if isinstance(cache, BlockMemoryCache) else None
        if isinstance(spec, LambdaSpec):
            return self._sliding(index, query, key, value, step, layer, spec, scaling, softcap, dropout)
        if layer is None:  # no cache (use_cache=False): this pass's tokens only
            layer = BlockMemoryLayer(spec)
            layer.lazy_initialization(key, value)
            plan, _ = build_plan(step, [0] * key.shape[0], spec)
        elif cache.in_decode_step:  # one token per row, its memory blocks formed (BlockMemoryCache.begin_decode_step)
            return self._decode_step(layer, query, key, value, step, spec, rotary, scaling, softcap, dropout)
        else:
            plan = cache.plan(step)
        block_attention = self._block_attention(query, key, value, rotary, dropout)
        return infllm_attention_waves(
            query, key, value, plan, layer, spec, rotary, scaling, softcap, dropout, block_attention
        )

    def _decode_step(self, layer, query, key, value, step, spec, rotary, scaling, softcap, dropout):
        engine = self._decode_engine(query, key, value, rotary, dropout)
        if engine is not None:
            out = infllm_decode_step(
                layer, query, key, value, step.positions, step.valid, spec, rotary, scaling, softcap, engine
            )
        else:
            out = attend_execution_block(
                layer, query, key, value, step.positions, step.valid, step.valid[:, 0], step.positions[:, 0], spec,
                rotary, scaling, softcap, dropout, self._block_attention(query, key, value, rotary, dropout),
            )  # fmt: skip
        return out.transpose(1, 2).to(query.dtype)

    def _decode_engine(self, query, key, value, rotary, dropout):
        """The kernel of a fixed-shape decode step (`infllm_decode`), or None for the reference's step."""
        return select_backend(self.method.backend, query.device).infllm_decode_step(query, key, value, rotary, dropout)

    def _block_attention(self, query, key, value, rotary, dropout):
        """The function that computes each execution block of this layer's pass (kernel or reference)."""
        return select_backend(self.method.backend, query.device).block_attention(query, key, value, rotary, dropout)

    def _sliding(self, index, query, key, value, step, layer, spec, scaling, softcap, dropout):
        cache_layer = layer if isinstance(layer, LambdaCacheLayer) else None
        return lambda_layer_attention(
            index,
            query,
            key,
            value,
            step,
            cache_layer,
            spec,
            self.structure.rotaries[index],
            scaling,
            self.method.backend,
            softcap,
            dropout,
        )
