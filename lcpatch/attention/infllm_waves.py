"""InfLLM over a whole forward pass at once: the pass's execution blocks batched into waves.

Spec: `infllm_attention_reference` (same arguments and result), which walks the execution blocks one
at a time. The walk looks sequential: an execution block's memory depends on the blocks formed before
it, and a block's representative keys on the attention its own queries got, memory included. But a
block forms only once its last token is n_local behind the first query that uses it, so execution
blocks whose first queries lie less than n_local apart never depend on one another. A *wave* is such
a run of execution blocks. Its memory blocks form together, its queries score the representative keys
in one product and one top-k, and its execution blocks are stacked as the rows of one batch for one
call of the backend's `block_attention`. A prefill chunk of 16 execution blocks with n_local worth 8 of
them takes 2 waves instead of 16 steps.

The tokens not yet in a memory block are read from `BlockMemoryLayer.recent`: the ring and the pass
side by side in position order, in which the ring each execution block would see is a window of the
same width, one execution block further for each. The scores its own block's queries give each token
accumulate there, and the ring is written back once, at the end of the pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..cache.block_memory import BlockMemoryLayer, ForwardPlan, RecentTokens, on_device
from ..kernels.specs import InfLLMSpec, Rotary
from .infllm_reference import (
    execution_block_attention,
    far_keys,
    query_sum_far,
    representative_key,
    select_blocks,
)


def waves(count: int, width: int, n_local: int) -> list[range]:
    """Runs of execution blocks `width` columns apart whose first columns lie less than n_local apart."""
    per_wave = (n_local - 1) // width + 1
    return [range(first, min(first + per_wave, count)) for first in range(0, count, per_wave)]


def infllm_attention_waves(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: ForwardPlan,
    layer: BlockMemoryLayer,
    spec: InfLLMSpec,
    rotary: Rotary,
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
    block_attention: Callable = execution_block_attention,
) -> torch.Tensor:
    """`infllm_attention_reference`, wave by wave. Returns (B, L, Hq, D) in the query's dtype."""
    batch, q_heads, length, _ = query.shape
    if plan.order is not None:
        gather = lambda t: t.gather(2, plan.order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))  # noqa: E731
        query, key, value = gather(query), gather(key), gather(value)
    # Left padding makes every execution block `width` columns wide (only the first can be narrower).
    width, count = min(spec.exc_block_size, length), len(plan.blocks)
    pad = count * width - length
    query, key, value = (F.pad(t, (0, 0, pad, 0)) for t in (query, key, value))
    positions, valid = F.pad(plan.positions, (pad, 0)), F.pad(plan.valid, (pad, 0))

    layer.write_init(key, value, positions, valid)
    recent = layer.recent(key, value, valid, plan.ends)
    out = torch.zeros(batch, q_heads, count * width, value.shape[-1], dtype=torch.float32, device=query.device)
    for wave in waves(count, width, spec.n_local):
        columns = slice(wave.start * width, wave.stop * width)
        # Each execution block has the blocks its first query needs, and those formed before it.
        counts = [[max(have, plan.blocks[e].targets[row]) for e in wave] for row, have in enumerate(layer.counts)]
        _form_blocks(layer, recent, [row[-1] for row in counts], spec, rotary)
        counts = on_device(counts, query.device)
        active = torch.stack([plan.blocks[e].active for e in wave], dim=1)
        block_out, own = _wave_attention(
            query[:, :, columns], positions[:, columns], valid[:, columns], counts, active, wave, width,
            layer, recent, spec, rotary, scaling, softcap, dropout, block_attention,
        )  # fmt: skip
        out[:, :, columns] = block_out
        for i, e in enumerate(wave):  # in order, so the sums are the reference's
            recent.scores[:, :, (e + 1) * width : (e + 1) * width + spec.ring_size] += own[:, i]
    layer.keep_recent(recent)

    out = out[:, :, pad:]
    if plan.order is not None:
        out = torch.zeros_like(out).scatter_(2, plan.order[:, None, :, None].expand_as(out), out)
    return out.transpose(1, 2).to(query.dtype)


def _form_blocks(
    layer: BlockMemoryLayer, recent: RecentTokens, targets: list[int], spec: InfLLMSpec, rotary: Rotary
) -> None:
    rows, keys, values, scores = layer.blocks_to_form(recent, targets)
    if rows:
        layer.push_blocks(rows, keys, values, representative_key(far_keys(keys, rotary), scores, spec.repr_topk))


def _wave_attention(
    query, positions, valid, counts, active, wave, width, layer, recent, spec, rotary, scaling, softcap, dropout,
    block_attention,
):  # fmt: skip
    """The execution blocks of one wave (queries (B, Hq, E * width, D)) as the rows of one batch.

    Returns their output (B, Hq, E * width, D) and the attention (B, E, Hkv, ring_size) each ring slot
    of each execution block got from queries of its own block."""
    batch, q_heads, _, dim = query.shape
    kv_heads, blocks = layer.init_keys.shape[1], len(wave)
    as_rows = lambda t: t.unflatten(1, (blocks, width)).flatten(0, 1)  # noqa: E731  (B, E * w) -> (B * E, w)
    q_rows = query.unflatten(2, (blocks, width)).transpose(1, 2).flatten(0, 1)
    q_positions, q_valid = as_rows(positions), as_rows(valid)

    # Selection: every execution block's query sum against the representative keys, one top-k.
    query_sum = query_sum_far(q_rows, q_valid, kv_heads, spec, rotary).unflatten(0, (batch, blocks))
    scores = torch.einsum("behd,bnhd->ben", query_sum, layer.representatives).flatten(0, 1)
    selected, wanted = select_blocks(scores, counts.flatten(), active.flatten(), spec.topk)
    k = selected.shape[1]
    if k:
        memory_keys, memory_values = layer.fetch_many(selected.view(batch, blocks, k), wanted.view(batch, blocks, k))
    else:
        memory_keys = layer.init_keys.new_zeros(batch * blocks, kv_heads, 0, dim)
        memory_values = layer.init_values.new_zeros(batch * blocks, kv_heads, 0, layer.init_values.shape[-1])
    memory = (memory_keys, memory_values, wanted.repeat_interleave(spec.block_size, dim=1))

    # Near keys: the init slots, then the ring this execution block would see, a window of `recent`.
    size, n_init = spec.ring_size, spec.n_init
    windows = slice(wave.start + 1, wave.stop + 1)
    window = lambda t: t.unfold(2, size, width)[:, :, windows].transpose(1, 2).transpose(-1, -2)  # noqa: E731
    init_keys, init_values = layer.init_kv()
    near_keys = torch.cat((init_keys[:, None].expand(-1, blocks, -1, -1, -1), window(recent.keys)), dim=3)
    near_values = torch.cat((init_values[:, None].expand(-1, blocks, -1, -1, -1), window(recent.values)), dim=3)
    ring_positions = recent.positions.unfold(1, size, width)[:, windows]
    base = n_init + spec.block_size * counts
    ring_valid = recent.held.unfold(1, size, width)[:, windows] & (ring_positions >= base[..., None])
    init_positions = torch.arange(n_init, device=query.device).expand(batch, blocks, -1)
    near = (
        near_keys.flatten(0, 1),
        near_values.flatten(0, 1),
        torch.cat((init_positions, ring_positions), dim=2).flatten(0, 1),
        torch.cat((torch.ones_like(init_positions, dtype=torch.bool), ring_valid), dim=2).flatten(0, 1),
    )
    out, near_attention = block_attention(
        q_rows, q_positions, q_valid, near, memory, spec, rotary, scaling, softcap, dropout
    )
    out = out.unflatten(0, (batch, blocks)).transpose(1, 2).flatten(2, 3)
    return out, near_attention[..., n_init:].unflatten(0, (batch, blocks))
