"""InfLLM execution-block attention on the Λ prefill kernel, plus the representative-score band.

Spec: `execution_block_attention` of the InfLLM reference (same arguments and results).

An execution block's attention is Λ attention in which every causal key is visible (n_global beyond
any position), with window = distance cap = n_local: pairs inside the local window at their true
distance, all others with the query at n_local and the key at 0. The kernel wants keys in stream
order with the queries as the last key slots, so keys are laid out as [selected memory blocks, placed
at a position outside every query's window | init slots | the ring sorted by position]. The kernel's
log-sum-exp then gives, for the few keys of each query's own block (a band at the end of the sorted
ring), the attention probabilities that representative keys are chosen by.
"""

from __future__ import annotations

import math

import torch

from .lambda_prefill import prefill_forward
from .specs import InfLLMSpec, LambdaSpec, Rotary

EVERY_KEY = 1 << 30  # n_global above any position: the Λ rule then hides no causal key


def execution_block_attention_triton(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    query_valid: torch.Tensor,
    near: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    spec: InfLLMSpec,
    rotary: Rotary,
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's `execution_block_attention`, computed by the Λ prefill kernel (no dropout)."""
    near_keys, near_values, near_positions, near_valid = near
    memory_keys, memory_values, memory_valid = memory
    batch, q_heads, length, _ = query.shape
    kv_heads = near_keys.shape[1]
    n_init = spec.n_init

    # The ring in position order: its slots hold distinct positions, the execution block's own last.
    ring_order = near_positions[:, n_init:].argsort(dim=1) + n_init
    order = torch.cat((torch.arange(n_init, device=query.device).expand(batch, -1), ring_order), dim=1)
    expand = order[:, None, :, None].expand(-1, kv_heads, -1, near_keys.shape[-1])
    near_keys, near_values = near_keys.gather(2, expand), near_values.gather(2, expand)
    near_positions, near_valid = near_positions.gather(1, order), near_valid.gather(1, order)

    first = query_positions.masked_fill(~query_valid, torch.iinfo(torch.int32).max).amin(dim=1, keepdim=True)
    memory_positions = (first - spec.n_local).expand(-1, memory_keys.shape[2])
    keys = torch.cat((memory_keys, near_keys), dim=2).to(query.dtype).contiguous()
    values = torch.cat((memory_values, near_values), dim=2).to(query.dtype).contiguous()
    positions = torch.cat((memory_positions, near_positions), dim=1).to(torch.int32).contiguous()
    valid = torch.cat((memory_valid, near_valid), dim=1).contiguous()
    rule = LambdaSpec(EVERY_KEY, spec.n_local, spec.n_local)
    q_positions = query_positions.to(torch.int32).contiguous()
    out, lse, _ = prefill_forward(
        query.contiguous(), keys, values, q_positions, positions, valid, rule, rotary, scaling, softcap, need_lse=True
    )

    # Own-block attention: a query's block starts at most block_size - 1 before it, so its keys lie in
    # the last length + block_size - 1 slots of the sorted ring.
    band = min(length + spec.block_size - 1, near_keys.shape[2] - n_init)
    band_keys, band_positions = near_keys[:, :, -band:], near_positions[:, -band:]
    group = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, group * length, -1)
    q_pos, q_valid = query_positions.repeat(1, group), query_valid.repeat(1, group)
    origin = query_positions.masked_fill(~query_valid, 0).amax(dim=1, keepdim=True)
    scores = rotary.rotate(q, q_pos - origin) @ rotary.rotate(band_keys, band_positions - origin).transpose(-1, -2)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    block = lambda positions: torch.div(positions - spec.n_init, spec.block_size, rounding_mode="floor")  # noqa: E731
    same_block = (
        q_valid[:, :, None]
        & near_valid[:, None, -band:]
        & (q_pos[:, :, None] >= spec.n_init)
        & (q_pos[:, :, None] >= band_positions[:, None, :])
        & (block(q_pos)[:, :, None] == block(band_positions)[:, None, :])
    )
    lse = lse.reshape(batch, kv_heads, group * length) * math.log(2.0)  # the kernel's is in base 2
    probabilities = torch.exp(scores - lse[..., None]).masked_fill(~same_block[:, None], 0.0)
    near_attention = torch.zeros(batch, kv_heads, near_positions.shape[1], device=query.device)
    near_attention.scatter_(2, order[:, None, -band:].expand(-1, kv_heads, -1), probabilities.sum(dim=2))
    return out.transpose(1, 2).to(torch.float32), near_attention
