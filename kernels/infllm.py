"""InfLLM execution-block attention on the Λ prefill kernel, plus the representative-score band.

Spec: `execution_block_attention` of the InfLLM reference (same arguments and results).

An execution block's attention is Λ attention in which every causal key is visible (n_global beyond
any position), with window = distance cap = n_local: pairs inside the local window at their true
distance, all others with the query at n_local and the key at 0. The kernel wants keys in stream
order with the queries as the last key slots; the near tokens come so (init slots, then the ring in
position order), and the selected memory blocks go before them, at a position outside every query's
window. The kernel's log-sum-exp then gives, for the few keys of each query's own block, the
attention probabilities that representative keys are chosen by: a query's own block lies in the
block_size slots of the ring that end at the query, so the queries go in groups, each scored against
one window of the ring's tail.

A decode step (one query per row) goes to the split-KV decode kernel instead, which takes keys in any
order and spreads them over the GPU's SMs; the prefill kernel would give the step one program per
query head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .lambda_decode import lambda_decode
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

    first = query_positions.masked_fill(~query_valid, torch.iinfo(torch.int32).max).amin(dim=1, keepdim=True)
    memory_positions = (first - spec.n_local).expand(-1, memory_keys.shape[2])
    keys = torch.cat((memory_keys, near_keys), dim=2).to(query.dtype)
    values = torch.cat((memory_values, near_values), dim=2).to(query.dtype)
    positions = torch.cat((memory_positions, near_positions), dim=1).to(torch.int32)
    valid = torch.cat((memory_valid, near_valid), dim=1)
    rule = LambdaSpec(EVERY_KEY, spec.n_local, spec.n_local)
    if length == 1:
        out, lse = lambda_decode(
            query, keys, values, query_positions.to(torch.int32), positions, valid, rule, rotary, scaling, softcap,
            need_lse=True,
        )  # fmt: skip
    else:
        # The last n_local near slots lie within every query's window (the last is the last query): the
        # kernel's window loop takes them, at their true distance only; the slots before go through its
        # prefix loop, which scores both distances.
        far_slots = keys.shape[2] - min(spec.n_local, near_keys.shape[2] - spec.n_init)
        out, lse, _ = prefill_forward(
            query.contiguous(), keys, values, query_positions.to(torch.int32).contiguous(), positions, valid,
            rule, rotary, scaling, softcap, need_lse=True, far_slots=far_slots,
        )  # fmt: skip
    lse = lse.view(batch, q_heads, length) * math.log(2.0)  # the kernel's is in base 2
    near_attention = own_block_attention(query, query_positions, query_valid, near, lse, spec, rotary, scaling, softcap)
    return out.transpose(1, 2).to(torch.float32), near_attention


def own_block_attention(query, query_positions, query_valid, near, lse, spec, rotary, scaling, softcap):
    """The attention (B, Hkv, N) each near token gets from the queries of its own block, given each
    query's log-sum-exp (B, Hq, X) in base e. Query j (of X) stands at near slot N - X + j, and its own
    block lies within the block_size slots that end there: queries go in groups of `size`, each scored
    against the `size + block_size - 1` slots that end at its last query."""
    near_keys, _, near_positions, near_valid = near
    batch, q_heads, length, _ = query.shape
    kv_heads = near_keys.shape[1]
    size = min(spec.block_size, length)
    groups = -(-length // size)
    pad = groups * size - length
    width, band = size + spec.block_size - 1, groups * size + spec.block_size - 1

    q_positions, q_valid = F.pad(query_positions, (pad, 0)), F.pad(query_valid, (pad, 0))
    origin = query_positions.masked_fill(~query_valid, 0).amax(dim=1, keepdim=True)
    q = rotary.rotate(F.pad(query, (0, 0, pad, 0)), q_positions - origin).mul_(scaling)
    q = q.view(batch, kv_heads, q_heads // kv_heads, groups, size, -1)
    k_positions, k_valid = near_positions[:, -band:], near_valid[:, -band:]
    k = rotary.rotate(near_keys[:, :, -band:], k_positions - origin).unfold(2, width, size)
    scores = torch.einsum("bhgcsd,bhcdw->bhgcsw", q, k)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap

    def block(positions):
        return torch.div(positions - spec.n_init, spec.block_size, rounding_mode="floor")

    q_positions, q_valid = q_positions.view(batch, groups, size, 1), q_valid.view(batch, groups, size, 1)
    k_positions, k_valid = k_positions.unfold(1, width, size)[:, :, None], k_valid.unfold(1, width, size)[:, :, None]
    same_block = (
        q_valid
        & k_valid
        & (q_positions >= spec.n_init)
        & (q_positions >= k_positions)
        & (block(q_positions) == block(k_positions))
    )
    lse = F.pad(lse, (pad, 0)).view(batch, kv_heads, q_heads // kv_heads, groups, size, 1)
    windows = scores.sub_(lse).exp_().mul_(same_block[:, None, None]).sum(dim=(2, 4))  # (B, Hkv, groups, width)
    attention = near_keys.new_zeros(batch, kv_heads, near_keys.shape[2], dtype=torch.float32)
    tail = attention[:, :, -band:]
    for g in range(groups):  # overlapping windows, at most exc_block_size / block_size of them
        tail[:, :, g * size : g * size + width] += windows[:, :, g]
    return attention


def decode_step_triton(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    query_valid: torch.Tensor,
    slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    band: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    spec: InfLLMSpec,
    rotary: Rotary,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's attention over key slots in any order, by their positions.

    query (B, Hq, 1, D) un-rotated at `query_positions`, `query_valid` (B, 1); slots = (keys, values
    (B, Hkv, S, D), positions, valid (B, S)): everything the step sees, memory blocks at a position
    outside the window; band = (keys (B, Hkv, X, D), positions, valid (B, X)): the X positions ending at
    the query, in order, among which its own block lies. Returns the output (B, Hq, 1, D) in fp32 and
    the attention (B, Hkv, X) each band token gets from the query if in its block (`own_block_attention`).
    """
    keys, values, positions, valid = slots
    band_keys, band_positions, band_valid = band
    rule = LambdaSpec(EVERY_KEY, spec.n_local, spec.n_local)
    out, lse = lambda_decode(
        query, keys, values, query_positions.to(torch.int32), positions, valid, rule, rotary, scaling, softcap,
        need_lse=True,
    )  # fmt: skip
    lse = lse.view(*query.shape[:3]) * math.log(2.0)  # the kernel's is in base 2
    near = (band_keys, None, band_positions, band_valid)
    attention = own_block_attention(query, query_positions, query_valid, near, lse, spec, rotary, scaling, softcap)
    return out.transpose(1, 2).to(torch.float32), attention
