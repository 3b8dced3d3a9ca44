"""InfLLM's execution-block attention on PyTorch's SDPA: the local window through SDPA, the far keys by hand.

Spec: `execution_block_attention` of the InfLLM reference (beside the block-memory cache it drives),
same arguments and results, without softcap or dropout (SDPA has neither).

A query's pairs split as Λ attention's do (`lambda_split`): near keys closer than n_local are seen at
their true distance, an ordinary attention (SDPA); near keys farther away and the selected memory
blocks are all seen at distance n_local (query at n_local, key at 0), a few hundred keys scored by
hand. `sdpa_merge.attend` combines them exactly and returns the log-sum-exp of each query's scores,
from which the attention each near token gets from its own block's queries (what block formation
reads) is taken for the few pairs concerned.
"""

from __future__ import annotations

import torch

from .sdpa_merge import attend, grouped_scores, head_width, with_virtual_key
from .specs import InfLLMSpec, Rotary


def _slots(wanted: torch.Tensor) -> torch.Tensor:
    """Indices of the near slots (B, N) that any batch row wants."""
    return wanted.any(dim=0).nonzero()[:, 0]


def execution_block_attention_split(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    query_valid: torch.Tensor,
    near: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    spec: InfLLMSpec,
    rotary: Rotary,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One execution block (queries (B, Hq, X, D), un-rotated) over its near and memory keys.

    Returns the output (B, Hq, X, D) in fp32 and the attention (B, Hkv, N) each near token got from
    queries of its own block (summed over queries and the heads of its group), as the reference does.
    """
    near_keys, near_values, near_positions, near_valid = near
    memory_keys, memory_values, memory_valid = memory
    dtype, device = query.dtype, query.device
    q_pos, q_valid = query_positions, query_valid
    origin = q_pos.masked_fill(~q_valid, 0).amax(dim=1, keepdim=True)  # small angles, exact in fp32
    distance = q_pos[:, :, None] - near_positions[:, None, :]  # (B, X, N)
    seen = q_valid[:, :, None] & near_valid[:, None, :] & (distance >= 0)
    local = seen & (distance < spec.n_local)

    # Local part: every near slot, through SDPA, masked to the pairs inside the window.
    width = head_width(query.shape[-1], near_values.shape[-1], device)
    near_local = rotary.rotate(near_keys, near_positions - origin)
    keys, values = with_virtual_key(near_local.to(dtype), near_values.to(dtype), width)
    mask = torch.cat((local.new_ones(local.shape[:2] + (1,)), local), dim=-1)
    q_local = rotary.rotate(query, q_pos - origin) * scaling

    # Far part: the near slots some query sees beyond its window, and the memory blocks.
    latest = q_pos.masked_fill(~q_valid, -1).amax(dim=1, keepdim=True)
    far = _slots(near_valid & (near_positions <= latest - spec.n_local))
    far_keys = torch.cat((near_keys[:, :, far], memory_keys.to(near_keys.dtype)), dim=2)
    far_values = torch.cat((near_values[:, :, far], memory_values.to(near_values.dtype)), dim=2)
    far_visible = torch.cat(
        (seen[:, :, far] & ~local[:, :, far], q_valid[:, :, None] & memory_valid[:, None, :]), dim=-1
    )
    q_far = rotary.rotate(query, torch.full_like(q_pos, spec.n_local)) * scaling
    k_far = rotary.rotate(far_keys, torch.zeros_like(far_keys[:, 0, :, 0], dtype=torch.long))
    far_scores = grouped_scores(q_far, k_far).masked_fill(~far_visible[:, None], float("-inf"))

    # Own-block pairs: a query's block starts at most block_size - 1 before it.
    block = lambda positions: torch.div(positions - spec.n_init, spec.block_size, rounding_mode="floor")  # noqa: E731
    first = q_pos.masked_fill(~q_valid, torch.iinfo(q_pos.dtype).max).amin(dim=1, keepdim=True)
    own = _slots(near_valid & (near_positions >= spec.n_init) & (block(near_positions) >= block(first)))
    own_positions = near_positions[:, own]
    same_block = (
        seen[:, :, own]
        & (q_pos[:, :, None] >= spec.n_init)
        & (own_positions[:, None, :] >= spec.n_init)
        & (block(q_pos)[:, :, None] == block(own_positions)[:, None, :])
    )
    own_local = grouped_scores(q_local, near_local[:, :, own])
    own_far = grouped_scores(q_far, rotary.rotate(near_keys[:, :, own], torch.zeros_like(own_positions)))
    own_scores = torch.where((distance[:, :, own] < spec.n_local)[:, None], own_local, own_far)
    own_scores = own_scores.masked_fill(~same_block[:, None], float("-inf"))

    # m near the log-sum-exp of everything: the far keys and the own block (which includes the query itself).
    shift = torch.logaddexp(torch.logsumexp(far_scores, dim=-1), torch.logsumexp(own_scores, dim=-1)).detach()
    out, lse = attend(q_local, keys, values, mask, far_scores, far_values, shift)

    with torch.no_grad():
        probabilities = torch.exp(own_scores - lse[..., None])  # (B, Hq, X, S)
        per_kv_head = probabilities.unflatten(1, (near_keys.shape[1], -1)).sum(dim=(2, 3))
        near_attention = torch.zeros(
            near_positions.shape[0], near_keys.shape[1], near_positions.shape[1], device=device
        )
        near_attention[:, :, own] = per_kv_head
    return out, near_attention
