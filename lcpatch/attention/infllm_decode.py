"""InfLLM's decode step on the kernels: one token per row, over the layer's step buffer where it lies.

Spec: `attend_execution_block` (the reference's step) for an execution block of one token: the same
output and the same cache updates. The reference gathers the ring into position order and
concatenates the init slots, the ring and the selected blocks into new key tensors, three copies of
~7k keys per layer and token at the published sizes. Here the selected blocks are copied into the
head of the buffer that the init slots and the ring live in (`BlockMemoryLayer.step_keys`), and the
decode kernel reads every slot in place, by its position (`BlockMemoryLayer.step_slots`); the
representative scores come from the few ring tokens where the query's own block lies (`ring_tail`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cache.block_memory import BlockMemoryLayer
from ..kernels.specs import InfLLMSpec, Rotary
from .infllm_reference import choose_blocks


def infllm_decode_step(
    layer: BlockMemoryLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    spec: InfLLMSpec,
    rotary: Rotary,
    scaling: float,
    softcap: float | None,
    engine: Callable,
) -> torch.Tensor:
    """One decode step (query (B, Hq, 1, D), key/value (B, Hkv, 1, D) at `positions`/`valid` (B, 1)) whose
    memory blocks are formed; `engine` is the backend's `infllm_decode_step`. Returns (B, Hq, 1, D) fp32.
    No host sync and fixed shapes, as a captured CUDA graph needs."""
    active, last = valid[:, 0], positions[:, 0]
    layer.write(key, value, positions, valid)
    selected, wanted = choose_blocks(layer, query, valid, active, spec, rotary)
    layer.fetch_into_step(selected, wanted)
    slot_positions, slot_valid = layer.step_slots(last, wanted)
    band_keys, band_positions, band_valid, band_slots = layer.ring_tail(last)
    out, attention = engine(
        query, positions, valid, (layer.step_keys, layer.step_values, slot_positions, slot_valid),
        (band_keys, band_positions, band_valid), spec, rotary, scaling, softcap,
    )  # fmt: skip
    layer.ring_scores.scatter_add_(2, band_slots[:, None].expand_as(attention), attention)
    return out
