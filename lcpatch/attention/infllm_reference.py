"""Pure-PyTorch InfLLM attention: the readable spec that kernels must match.

Per row of the batch and per layer, with positions counted over the row's real tokens only:

1. Init tokens are positions j < n_init. A later token belongs to memory block
   b = (j - n_init) // block_size.
2. Execution blocks: each forward pass's real tokens of a row are split into groups of
   `exc_block_size`, counted back from the row's last token (decoding: one token each).
3. A block *forms* for an execution block whose first query s sees all of it outside its local
   window: n_init + (b + 1) * block_size - 1 <= s - n_local. Each kv head then keeps the
   `repr_topk` keys that received the most attention from the block's own queries (summed over
   the heads of its group; ties go to the earlier token) and represents the block by their mean.
4. Selection: the execution block's queries, rotated at distance n_local, are summed over queries
   and over the heads of each group; a formed block scores sum_heads <query sum, representative>
   (the mean inner product up to a constant). The `topk` best formed blocks are selected, the same
   for every head of the layer, as the paper's code does.
5. Attention: query i sees the init tokens j <= i, the selected blocks, and every token j <= i
   that is not in a formed block (its local window, plus tokens that left it while their block is
   still forming), in one softmax. Pairs with i - j < n_local are rotated at their true distance,
   all other pairs at distance n_local (query at n_local, key at 0).

Differences from the paper and its code are listed in the README's InfLLM section.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cache.block_memory import BlockMemoryLayer, ForwardPlan
from ..kernels.lambda_reference import masked_softmax
from ..kernels.specs import InfLLMSpec, Rotary


def far_keys(keys: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Keys (B, H, N, D) as every query outside their local window sees them: rotated at position 0 (fp32)."""
    return rotary.rotate(keys, torch.zeros(keys.shape[0], keys.shape[2], dtype=torch.long, device=keys.device))


def representative_key(keys_far: torch.Tensor, scores: torch.Tensor, repr_topk: int) -> torch.Tensor:
    """Mean (R, H, D) of the `repr_topk` keys of each block (R, H, block, D) with the highest scores (R, H, block)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :repr_topk]
    chosen = keys_far.gather(2, order[..., None].expand(-1, -1, -1, keys_far.shape[-1]))
    return chosen.mean(dim=2)


def query_sum_far(query: torch.Tensor, valid: torch.Tensor, kv_heads: int, spec: InfLLMSpec, rotary: Rotary):
    """The sum (B, Hkv, D) over an execution block's valid queries (B, Hq, X, D) and the heads of each kv
    group, rotated at distance n_local. Rotating at one position is linear, so the sum is rotated once."""
    total = (query * valid[:, None, :, None]).unflatten(1, (kv_heads, -1)).sum(dim=(2, 3), dtype=torch.float32)
    return rotary.rotate(total[:, :, None], torch.full_like(valid[:, :1], spec.n_local, dtype=torch.long))[:, :, 0]


def block_scores(query_sum: torch.Tensor, representatives: torch.Tensor) -> torch.Tensor:
    """Selection scores (B, N): query sums (B, H, D) against representative keys (B, N, H, D), summed over heads."""
    return torch.einsum("bhd,bnhd->bn", query_sum, representatives)


def select_blocks(
    scores: torch.Tensor, counts: torch.Tensor, active: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `topk` best formed blocks per row (ties: earlier block), in ascending order (B, k), and which
    entries are real (B, k).

    scores (B, N) of the blocks, of which each row's first counts[b] are formed.
    """
    capacity = scores.shape[1]
    k = min(topk, capacity)
    formed = torch.arange(capacity, device=counts.device) < counts[:, None]
    # A stable sort, so that ties (e.g. a zero query) go to the earlier block on every device.
    top = torch.sort(scores.masked_fill(~formed, float("-inf")), dim=-1, descending=True, stable=True).indices[:, :k]
    wanted = formed.gather(1, top) & active[:, None]
    # Position order for the keys; entries that select nothing sort last.
    selected = torch.where(wanted, top, capacity).sort(dim=-1).values
    wanted = selected < capacity
    return selected.clamp(max=max(capacity - 1, 0)), wanted


def execution_block_attention(
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
    """One execution block's attention over un-rotated queries (B, Hq, X, D).

    near = (keys, values, positions, valid): the init slots, then the ring in position order, its last
    slot the execution block's last query (B, Hkv, N, D), seen at the distance rule of the module
    docstring; memory = (keys, values, valid): the selected blocks, seen by every query at distance n_local.
    Returns the output (B, Hq, X, D) in fp32 and the attention (B, Hkv, N) each near token got from
    queries of its own block (summed over queries and the heads of its group).
    """
    batch, q_heads, length, _ = query.shape
    near_keys, near_values, near_positions, near_valid = near
    memory_keys, memory_values, memory_valid = memory
    kv_heads = near_keys.shape[1]
    group = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, group * length, -1)  # heads of one group share their keys
    q_pos, q_valid = query_positions.repeat(1, group), query_valid.repeat(1, group)

    # Rotating relative to the last query keeps angles small and exact in fp32; scores depend only
    # on differences of positions.
    origin = query_positions.masked_fill(~query_valid, 0).amax(dim=1, keepdim=True)
    q_local = rotary.rotate(q, q_pos - origin)
    q_far = rotary.rotate(q, torch.full_like(q_pos, spec.n_local))
    near_local = q_local @ rotary.rotate(near_keys, near_positions - origin).transpose(-1, -2)
    near_far = q_far @ far_keys(near_keys, rotary).transpose(-1, -2)
    distance = q_pos[:, :, None] - near_positions[:, None, :]
    near_scores = torch.where((distance < spec.n_local)[:, None], near_local, near_far)
    memory_scores = q_far @ far_keys(memory_keys, rotary).transpose(-1, -2)

    scores = torch.cat((near_scores, memory_scores), dim=-1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    near_visible = near_valid[:, None, :] & (distance >= 0)
    memory_visible = memory_valid[:, None, :].expand(-1, q_pos.shape[1], -1)
    visible = q_valid[:, :, None] & torch.cat((near_visible, memory_visible), dim=-1)
    weights = masked_softmax(scores, visible[:, None])

    n_near = near_keys.shape[2]
    block = lambda positions: torch.div(positions - spec.n_init, spec.block_size, rounding_mode="floor")  # noqa: E731
    same_block = (
        (q_pos[:, :, None] >= spec.n_init)
        & (near_positions[:, None, :] >= spec.n_init)
        & (block(q_pos)[:, :, None] == block(near_positions)[:, None, :])
    )
    near_attention = (weights[..., :n_near] * same_block[:, None]).sum(dim=2)

    if dropout > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout, training=True)
    values = torch.cat((near_values, memory_values), dim=-2).to(torch.float32)
    out = (weights @ values).reshape(batch, q_heads, length, -1)
    return out, near_attention


def form_blocks(layer: BlockMemoryLayer, targets: list[int], spec: InfLLMSpec, rotary: Rotary) -> None:
    """Form each row's memory blocks, oldest first, until it has `targets[row]` of them."""
    while rows := layer.rows_forming(targets):
        keys, values, scores = layer.oldest_recent_block(rows)
        layer.push_blocks(rows, keys, values, representative_key(far_keys(keys, rotary), scores, spec.repr_topk))


def choose_blocks(layer: BlockMemoryLayer, query, valid, active, spec: InfLLMSpec, rotary: Rotary):
    """`select_blocks` for one execution block (queries (B, Hq, X, D), `valid` (B, X)) over `layer`'s formed blocks."""
    query_sum = query_sum_far(query, valid, layer.representatives.shape[2], spec, rotary)
    return select_blocks(block_scores(query_sum, layer.representatives), layer.block_counts(), active, spec.topk)


def attend_execution_block(
    layer: BlockMemoryLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    active: torch.Tensor,
    last: torch.Tensor,
    spec: InfLLMSpec,
    rotary: Rotary,
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
    block_attention: Callable = execution_block_attention,
) -> torch.Tensor:
    """One execution block (queries (B, Hq, X, D), its keys/values (B, Hkv, X, D) at `positions`/`valid`
    (B, X)) whose memory blocks are formed: store its tokens, select, attend. `active` (B,): rows with
    a real query here; `last` (B,): each row's last position. Returns (B, Hq, X, D) in fp32.

    No host sync and no shape that depends on the data (with the blocks on the device), so that a
    decode step of one token per row can be captured as a CUDA graph."""
    batch, kv_heads = key.shape[0], key.shape[1]
    layer.write(key, value, positions, valid)
    selected, wanted = choose_blocks(layer, query, valid, active, spec, rotary)
    if selected.shape[1]:
        memory_keys, memory_values = layer.fetch(selected, wanted)
    else:
        memory_keys = key.new_zeros(batch, kv_heads, 0, key.shape[-1])
        memory_values = value.new_zeros(batch, kv_heads, 0, value.shape[-1])
    memory = (memory_keys, memory_values, wanted.repeat_interleave(spec.block_size, dim=1))

    init_keys, init_values = layer.init_kv()
    init_positions = torch.arange(spec.n_init, device=query.device).expand(batch, -1)
    ring_keys, ring_values, ring_positions, ring_valid = layer.ring_kv(last)
    near = (
        torch.cat((init_keys, ring_keys), dim=2),
        torch.cat((init_values, ring_values), dim=2),
        torch.cat((init_positions, ring_positions), dim=1),
        torch.cat((torch.ones_like(init_positions, dtype=torch.bool), ring_valid), dim=1),
    )
    out, near_attention = block_attention(
        query, positions, valid, near, memory, spec, rotary, scaling, softcap, dropout
    )
    layer.add_scores(near_attention[..., spec.n_init :], last)
    return out


def infllm_attention_reference(
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
    """InfLLM attention of one forward pass over un-rotated q/k, storing its tokens in `layer`.

    query (B, Hq, L, D), key/value (B, Hkv, L, D): this pass's tokens only; the history is in `layer`.
    Returns (B, L, Hq, D) in the query's dtype, as transformers' attention functions do.
    `block_attention` computes one execution block (a kernel may stand in for the reference's).
    """
    if plan.order is not None:
        gather = lambda t: t.gather(2, plan.order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))  # noqa: E731
        query, key, value = gather(query), gather(key), gather(value)
    out = torch.zeros(*query.shape[:3], value.shape[-1], dtype=torch.float32, device=query.device)
    for block in plan.blocks:
        form_blocks(layer, block.targets, spec, rotary)
        columns = slice(block.start, block.stop)
        out[:, :, columns] = attend_execution_block(
            layer, query[:, :, columns], key[:, :, columns], value[:, :, columns], plan.positions[:, columns],
            plan.valid[:, columns], block.active, block.last, spec, rotary, scaling, softcap, dropout, block_attention,
        )  # fmt: skip

    if plan.order is not None:
        out = torch.zeros_like(out).scatter_(2, plan.order[:, None, :, None].expand_as(out), out)
    return out.transpose(1, 2).to(query.dtype)
