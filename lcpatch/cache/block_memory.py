"""InfLLM's KV cache: init tokens, a ring of recent tokens and a store of memory blocks, per layer.

Every row of a batch keeps its own bookkeeping, keyed by the positions of its real tokens
(padding never enters the cache): position j < n_init lives in init slot j, later positions in
ring slot j mod ring_size until their block of `block_size` tokens leaves the local window and
becomes memory block (j - n_init) // block_size. Rows of a left-padded batch therefore form the
same blocks, at the same positions, as each prompt alone.

Memory blocks live either on the model's device (`_DeviceBlocks`) or in (pinned) host memory
with a per-row LRU of `max_cached_blocks` device slots (`_HostBlocks`). Both return the same
tensors for the same blocks, so results do not depend on where the blocks are kept.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from ..errors import CacheError, SequenceLimitError
from ..kernels.specs import InfLLMSpec, LambdaSpec, StepInfo
from .lambda_cache import LambdaCacheLayer
from .step import FixedShapeDecoding, StepAwareCache

# With offload 'auto', memory blocks move to host memory once growing them on the GPU would leave
# less than this fraction of its memory free (activations of a prefill chunk need room too).
AUTO_OFFLOAD_FREE_FRACTION = 0.15
HOST_PAGE_BLOCKS = 64  # host memory grows by pages of this many blocks, never by copying what it holds


@dataclass
class ExecutionBlock:
    """Columns [start, stop) of a right-justified forward pass, attended together."""

    start: int
    stop: int
    targets: list[int]  # memory blocks each row must have formed before this execution block attends
    active: torch.Tensor  # (B,) rows with at least one real query here
    last: torch.Tensor  # (B,) position of each active row's last query


@dataclass
class RecentTokens:
    """The tokens not yet in a memory block around one forward pass, in position order, per layer."""

    keys: torch.Tensor  # (B, H, W, D)
    values: torch.Tensor  # (B, H, W, D)
    scores: torch.Tensor  # (B, H, W) fp32: attention from queries of the token's own block
    positions: torch.Tensor  # (B, W)
    held: torch.Tensor  # (B, W) whether the column holds a token (init tokens never do)
    ends: list[int]  # per row: last position + 1


@dataclass
class ForwardPlan:
    """How one forward pass's tokens are laid out for InfLLM, shared by all layers.

    Each row's real tokens are right-justified (`order` gathers them; None when they already
    are), so execution blocks, counted back from each row's last token, are common columns.
    """

    order: torch.Tensor | None
    positions: torch.Tensor  # (B, L) right-justified
    valid: torch.Tensor  # (B, L) right-justified
    blocks: list[ExecutionBlock]
    ends: list[int]  # per row: its last position + 1 after this pass


def blocks_formed(first_query: int, spec: InfLLMSpec) -> int:
    """Memory blocks that exist for an execution block starting at position `first_query`: every
    block whose last token lies outside that query's local window."""
    return max(0, (first_query - spec.n_local + 1 - spec.n_init) // spec.block_size)


def build_plan(step: StepInfo, seen: list[int], spec: InfLLMSpec) -> tuple[ForwardPlan, list[int]]:
    """The plan of one forward pass for rows that have `seen` real tokens so far; also returns the new counts."""
    valid_host = step.valid.cpu()  # the one host sync per forward pass: block bookkeeping lives on the host
    batch, length = valid_host.shape
    counts = valid_host.sum(dim=1).tolist()
    device = step.positions.device
    if bool((valid_host[:, :-1] <= valid_host[:, 1:]).all()):
        order, positions, valid = None, step.positions, step.valid
    else:
        order = torch.sort(step.valid.to(torch.int8), dim=1, stable=True).indices
        positions, valid = step.positions.gather(1, order), step.valid.gather(1, order)
    first_column = [length - n for n in counts]  # of each row's real tokens, once right-justified
    ends = [s + n for s, n in zip(seen, counts, strict=True)]
    end = on_device(ends, device)
    expected = end[:, None] - length + torch.arange(length, device=device)
    wrong = (valid & (positions != expected)).nonzero()
    if len(wrong):
        row, column = wrong[0].tolist()
        raise SequenceLimitError(
            "infllm keys its memory by token position: the real (unmasked) tokens of each row must have positions "
            f"0, 1, 2, ... in order, continuing the cache. Row {row}'s real token {column - first_column[row]} has "
            f"position {int(positions[row, column])}, expected {int(expected[row, column])}. Let generate() compute "
            "position_ids from the attention mask (or pass them so)."
        )
    blocks = []
    for stop in range(length, 0, -spec.exc_block_size):
        start = max(0, stop - spec.exc_block_size)
        targets = [
            blocks_formed(s + max(start, f) - f, spec) if stop > f else 0
            for s, f in zip(seen, first_column, strict=True)
        ]
        active = on_device([stop > f for f in first_column], device, torch.bool)
        blocks.append(ExecutionBlock(start, stop, targets, active, end - length + stop - 1))
    return ForwardPlan(order, positions, valid, blocks[::-1], ends), ends


def on_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on `device`, without the host waiting for the device: a plain
    `torch.tensor(..., device="cuda")` synchronises, which would stall the layer loop once per wave."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _block_tensor(like: torch.Tensor, count: int, block_size: int, **where) -> torch.Tensor:
    """Zeros (B, count, H, block_size, D) shaped after `like` (B, H, *, D)."""
    batch, heads, _, dim = like.shape
    where.setdefault("device", like.device)
    return torch.zeros(batch, count, heads, block_size, dim, dtype=like.dtype, **where)


def _token_index(slot: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scatter/gather index (B, H, X, D) over the token dim of `like` (B, H, *, D) from slots (B, X)."""
    return slot[:, None, :, None].expand(-1, like.shape[1], -1, like.shape[-1])


def _capacity(held: int, needed: int) -> int:
    """Room to allocate for `needed` entries where `held` exist: a quarter more each time, so that appends
    stay amortised O(1) while at most a quarter of the block store (gigabytes at 128k tokens) lies unused."""
    return max(needed, held + held // 4)


def _grow(tensor: torch.Tensor, dim: int, needed: int) -> torch.Tensor:
    """`tensor` with room for `needed` entries along `dim` (see `_capacity`)."""
    if tensor.shape[dim] >= needed:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = _capacity(shape[dim], needed)
    grown = tensor.new_zeros(shape)
    grown.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return grown


class _DeviceBlocks:
    """Memory blocks kept on the model's device: one tensor (B, capacity, H, block, D) per keys / values."""

    offloaded = False

    def __init__(self, keys_like: torch.Tensor, values_like: torch.Tensor, block_size: int):
        self.keys = _block_tensor(keys_like, 0, block_size)
        self.values = _block_tensor(values_like, 0, block_size)

    def bytes_to_hold(self, count: int) -> int:
        """Extra bytes a growth to `count` blocks would allocate (0 if it fits)."""
        capacity = self.keys.shape[1]
        if count <= capacity:
            return 0
        per_block = sum(math.prod((t.shape[0], *t.shape[2:])) * t.element_size() for t in (self.keys, self.values))
        return per_block * _capacity(capacity, count)

    def append(self, rows: list[int], index: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = _grow(self.keys, 1, max(index) + 1)
        self.values = _grow(self.values, 1, max(index) + 1)
        r, i = on_device(rows, keys.device), on_device(index, keys.device)
        self.keys[r, i] = keys
        self.values[r, i] = values

    def fetch(self, selected: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(selected.shape[0], device=selected.device)[:, None]
        return self.keys[rows, selected], self.values[rows, selected]

    def fetch_each(self, selected: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.fetch(selected.flatten(1), wanted.flatten(1))
        return keys.unflatten(1, selected.shape[1:]), values.unflatten(1, selected.shape[1:])


class _HostBlocks:
    """Memory blocks in (pinned) host memory; each row keeps an LRU of `slots` blocks on the device.

    Copies both ways are non-blocking and ordered on the current stream, so the host never waits
    for a transfer and a slot is never read before its copy lands.
    """

    offloaded = True

    def __init__(self, keys_like: torch.Tensor, values_like: torch.Tensor, block_size: int, slots: int):
        self.likes = (keys_like, values_like)
        self.block_size = block_size
        self.pin = keys_like.device.type == "cuda"
        self.pages: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.slot_keys = _block_tensor(keys_like, slots, block_size)
        self.slot_values = _block_tensor(values_like, slots, block_size)
        self.resident: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(keys_like.shape[0])]
        self.loads = 0  # host-to-device block copies so far

    def adopt(self, blocks: _DeviceBlocks, stored: int) -> _HostBlocks:
        """Take over the first `stored` blocks of a device store; returns self."""
        for first in range(0, stored, HOST_PAGE_BLOCKS):
            n = min(HOST_PAGE_BLOCKS, stored - first)
            keys, values = self._page(first // HOST_PAGE_BLOCKS)
            keys[:, :n].copy_(blocks.keys[:, first : first + n], non_blocking=True)
            values[:, :n].copy_(blocks.values[:, first : first + n], non_blocking=True)
        return self

    def _page(self, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.pages) <= page:
            try:
                self.pages.append(
                    tuple(
                        _block_tensor(like, HOST_PAGE_BLOCKS, self.block_size, device="cpu", pin_memory=self.pin)
                        for like in self.likes
                    )
                )
            except (RuntimeError, MemoryError) as exc:  # cudaHostAlloc and the CPU allocator both say so
                raise self._out_of_host_memory() from exc
        return self.pages[page]

    def _out_of_host_memory(self) -> CacheError:
        page = sum(math.prod(like.shape[:2]) * like.shape[3] * like.element_size() for like in self.likes)
        page *= HOST_PAGE_BLOCKS * self.block_size
        held = len(self.pages) * page
        kind = "pinned CPU memory" if self.pin else "CPU memory"
        return CacheError(
            f"infllm, its memory blocks offloaded, could not allocate {page / 2**20:.3g} MiB more {kind} for one "
            f"layer's memory blocks (it holds {held / 2**30:.3g} GiB, {len(self.pages) * HOST_PAGE_BLOCKS} blocks of "
            f"{self.block_size} tokens per row). InfLLM keeps the keys and values of every token of every layer; for "
            "this context they exceed the host's memory. Give a shorter prompt or fewer rows, or free host memory."
        )

    def append(self, rows: list[int], index: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        for n, (row, block) in enumerate(zip(rows, index, strict=True)):
            page_keys, page_values = self._page(block // HOST_PAGE_BLOCKS)
            page_keys[row, block % HOST_PAGE_BLOCKS].copy_(keys[n], non_blocking=True)
            page_values[row, block % HOST_PAGE_BLOCKS].copy_(values[n], non_blocking=True)

    def _slot_for(self, row: int, block: int, wanted: set[int]) -> int:
        lru = self.resident[row]
        if block in lru:
            lru.move_to_end(block)
            return lru[block]
        if len(lru) < self.slot_keys.shape[1]:
            slot = len(lru)
        else:  # max_cached_blocks >= topk, so some resident block is not wanted now
            victim = next(b for b in lru if b not in wanted)
            slot = lru.pop(victim)
        page_keys, page_values = self.pages[block // HOST_PAGE_BLOCKS]
        self.slot_keys[row, slot].copy_(page_keys[row, block % HOST_PAGE_BLOCKS], non_blocking=True)
        self.slot_values[row, slot].copy_(page_values[row, block % HOST_PAGE_BLOCKS], non_blocking=True)
        self.loads += 1
        lru[block] = slot
        return slot

    def fetch(self, selected: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.fetch_each(selected[:, None], wanted[:, None])
        return keys[:, 0], values[:, 0]

    def fetch_each(self, selected: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks (B, E, k) that E execution blocks select, loaded for one execution block after
        the other (the device LRU may hold fewer than E * k), with a single host sync for all of them."""
        chosen, flags = selected.tolist(), wanted.tolist()
        rows = torch.arange(selected.shape[0], device=self.slot_keys.device)[:, None]
        keys, values = [], []
        for e in range(selected.shape[1]):
            slots = []
            for row, (row_blocks, row_flags) in enumerate(zip(chosen, flags, strict=True)):
                blocks, wants = row_blocks[e], row_flags[e]
                needed = {b for b, w in zip(blocks, wants, strict=True) if w}
                slots.append([self._slot_for(row, b, needed) if w else 0 for b, w in zip(blocks, wants, strict=True)])
            index = on_device(slots, self.slot_keys.device)
            # A gather copies, so the slots may be reloaded for the next execution block.
            keys.append(self.slot_keys[rows, index])
            values.append(self.slot_values[rows, index])
        return torch.stack(keys, dim=1), torch.stack(values, dim=1)


def _device_has_room(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda" or nbytes == 0:
        return True
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free - nbytes >= AUTO_OFFLOAD_FREE_FRACTION * total


class BlockMemoryLayer(CacheLayerMixin):
    """One InfLLM layer: init slots, a ring of recent tokens with their representative scores, memory blocks.

    `update` only counts tokens: InfLLM attention stores them itself, one execution block at a
    time, because the blocks that form depend on the attention of earlier execution blocks.
    """

    is_sliding = False

    def __init__(self, spec: InfLLMSpec, offload: str = "gpu", max_cached_blocks: int = 32):
        super().__init__()
        self.spec = spec
        self.offload = offload
        self.max_cached_blocks = max_cached_blocks
        self.cumulative_length = 0
        # Times a tensor that a decode step reads was allocated anew: a captured step must be captured again.
        self.reallocations = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        spec = self.spec
        self.dtype, self.device = key_states.dtype, key_states.device
        # One buffer per keys / values holds, in this order, room for the blocks a decode step selects,
        # the init slots and the ring, so that a step's kernel reads all its keys from one tensor, in
        # slot order (`step_slots`). Init and ring have one extra slot each: padding tokens are
        # scattered there, which keeps writes free of host syncs.
        total = self._memory_slots + spec.n_init + 1 + spec.ring_size + 1
        self.step_keys = key_states.new_zeros(batch, heads, total, dim)
        self.step_values = value_states.new_zeros(batch, heads, total, value_states.shape[-1])
        self.ring_scores = torch.zeros(batch, heads, spec.ring_size + 1, device=self.device)
        self.representatives = torch.zeros(batch, 0, heads, dim, device=self.device)
        self.counts = [0] * batch
        self.count_tensor = torch.zeros(batch, dtype=torch.long, device=self.device)  # `counts`, written in place
        self._likes = (
            key_states.new_zeros(batch, heads, 0, dim),
            value_states.new_zeros(batch, heads, 0, value_states.shape[-1]),
        )
        if self.offload == "cpu":
            self.blocks = _HostBlocks(*self._likes, spec.block_size, self.max_cached_blocks)
        else:
            self.blocks = _DeviceBlocks(*self._likes, spec.block_size)
        self.is_initialized = True
        self.reallocations += 1

    @property
    def _memory_slots(self) -> int:
        """Slots at the head of the step buffer: the blocks a decode step selects."""
        return self.spec.topk * self.spec.block_size

    # Views of the step buffer, made where they are used: a view kept from a no_grad pass could not be
    # written in place under autograd (training with a cache).
    @property
    def init_keys(self) -> torch.Tensor:
        return self.step_keys.narrow(2, self._memory_slots, self.spec.n_init + 1)

    @property
    def init_values(self) -> torch.Tensor:
        return self.step_values.narrow(2, self._memory_slots, self.spec.n_init + 1)

    @property
    def ring_keys(self) -> torch.Tensor:
        return self.step_keys.narrow(2, self.step_keys.shape[2] - self.spec.ring_size - 1, self.spec.ring_size + 1)

    @property
    def ring_values(self) -> torch.Tensor:
        return self.step_values.narrow(2, self.step_values.shape[2] - self.spec.ring_size - 1, self.spec.ring_size + 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != len(self.counts):
            raise CacheError(
                f"this InfLLM cache holds {len(self.counts)} rows but a batch of {key_states.shape[0]} was passed; "
                "use one cache per batch (lcpatch.make_cache(model))."
            )
        self.cumulative_length += key_states.shape[-2]
        return key_states, value_states

    # -- tokens --------------------------------------------------------------------------------
    def write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Store the keys/values (B, H, X, D) of real tokens at their positions' slots."""
        self.write_init(keys, values, positions, valid)
        is_ring = valid & (positions >= self.spec.n_init)
        self._store_ring(keys, values, torch.zeros_like(keys[..., 0], dtype=torch.float32), positions, is_ring)

    def write_init(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        """Store the real tokens (B, H, X, D) among these that are init tokens in their slots."""
        is_init = valid & (positions < self.spec.n_init)
        slot = torch.where(is_init, positions, self.spec.n_init)
        self.init_keys.scatter_(2, _token_index(slot, keys), keys.to(self.dtype))
        self.init_values.scatter_(2, _token_index(slot, values), values.to(self.dtype))

    def _store_ring(self, keys, values, scores, positions: torch.Tensor, stored: torch.Tensor) -> None:
        size = self.spec.ring_size
        slot = torch.where(stored, positions % size, size)
        self.ring_keys.scatter_(2, _token_index(slot, keys), keys.to(self.dtype))
        self.ring_values.scatter_(2, _token_index(slot, values), values.to(self.dtype))
        self.ring_scores.scatter_(2, slot[:, None, :].expand(-1, keys.shape[1], -1), scores)

    def init_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Init slots (B, H, n_init, D); slot j holds position j."""
        return self.init_keys[:, :, :-1], self.init_values[:, :, :-1]

    def _ring_in_order(self, last: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Positions last - count + 1 ... last (B, count) that the ring holds, given each row's last written
        position; all of them (count = ring_size) by default."""
        count = count or self.spec.ring_size
        return last[:, None] - count + 1 + torch.arange(count, device=last.device)

    def ring_kv(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ring in position order (`_ring_in_order(last)`): keys/values (B, H, R, D), their positions
        (B, R), and which of them hold tokens not yet in a memory block."""
        positions = self._ring_in_order(last)
        slot = positions % self.spec.ring_size
        base = self.spec.n_init + self.spec.block_size * self.count_tensor
        keys = self.ring_keys.gather(2, _token_index(slot, self.ring_keys))
        values = self.ring_values.gather(2, _token_index(slot, self.ring_values))
        return keys, values, positions, positions >= base[:, None]

    def step_slots(self, last: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity (B, S) of the step buffer's slots for a decode step whose query is at
        `last` (B,), after `fetch_into_step` put the blocks `wanted` (B, k) in its head. Memory slots
        stand n_local before the query (outside its window); a ring slot holds the latest position
        congruent to it, valid if written and not yet in a memory block."""
        spec, size, memory = self.spec, self.spec.ring_size, self._memory_slots
        held = wanted.repeat_interleave(spec.block_size, dim=1)
        held = torch.nn.functional.pad(held, (0, memory - held.shape[1]))
        init = torch.arange(spec.n_init + 1, device=last.device)
        ring = torch.arange(size + 1, device=last.device)
        ring_positions = last[:, None] - (last[:, None] - ring) % size
        base = spec.n_init + spec.block_size * self.count_tensor
        positions = torch.cat(
            (
                (last - spec.n_local)[:, None].expand(-1, memory),
                init.expand(last.shape[0], -1),
                ring_positions,
            ),
            dim=1,
        )
        valid = torch.cat(
            (held, (init < spec.n_init) & (init <= last[:, None]), (ring < size) & (ring_positions >= base[:, None])),
            dim=1,
        )
        return positions, valid

    def ring_tail(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ring's last block_size positions up to `last` (B,), where a query at `last` finds its own
        block: keys (B, H, block, D), positions, which are ring tokens (B, block), and their ring slots."""
        positions = self._ring_in_order(last, self.spec.block_size)
        slots = positions % self.spec.ring_size
        keys = self.ring_keys.gather(2, _token_index(slots, self.ring_keys))
        return keys, positions, positions >= self.spec.n_init, slots

    def add_scores(self, attention: torch.Tensor, last: torch.Tensor) -> None:
        """Accumulate the attention (B, H, R) that the ring's tokens, in `ring_kv(last)`'s order, received
        from queries of their own block."""
        slot = self._ring_in_order(last) % self.spec.ring_size
        self.ring_scores.scatter_add_(2, slot[:, None, :].expand_as(attention), attention)

    # -- memory blocks -------------------------------------------------------------------------
    def rows_forming(self, targets: list[int]) -> list[int]:
        """Rows that still have a block to form before reaching `targets`."""
        return [row for row, (have, want) in enumerate(zip(self.counts, targets, strict=True)) if have < want]

    def oldest_recent_block(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (R, H, block, D) and representative scores (R, H, block) of each row's next block."""
        spec = self.spec
        first = on_device([spec.n_init + spec.block_size * self.counts[r] for r in rows], self.device)
        slots = (first[:, None] + torch.arange(spec.block_size, device=self.device)) % spec.ring_size
        index = on_device(rows, self.device)[:, None]
        keys = self.ring_keys[index, :, slots].transpose(1, 2)
        values = self.ring_values[index, :, slots].transpose(1, 2)
        scores = self.ring_scores[index, :, slots].transpose(1, 2)
        return keys, values, scores

    def push_blocks(
        self, rows: list[int], keys: torch.Tensor, values: torch.Tensor, representative: torch.Tensor
    ) -> None:
        """Append memory blocks, the next of its row for each entry of `rows` (a row may repeat: its
        blocks in order): keys and values (R, H, block, D) as cached (un-rotated), and the
        representative key (R, H, D) that selection scores each by."""
        counts = list(self.counts)
        index = []
        for row in rows:
            index.append(counts[row])
            counts[row] += 1
        held = self._grown_tensors()
        self._make_room(max(index) + 1)
        self.representatives = _grow(self.representatives, 1, max(index) + 1)
        r, i = on_device(rows, self.device), on_device(index, self.device)
        self.representatives[r, i] = representative.to(self.representatives.dtype)
        self.blocks.append(rows, index, keys.to(self.dtype), values.to(self.dtype))
        self.counts = counts
        self.count_tensor.copy_(on_device(counts, self.device), non_blocking=True)
        if any(a is not b for a, b in zip(held, self._grown_tensors(), strict=True)):
            self.reallocations += 1

    def _grown_tensors(self) -> tuple:
        """What pushing blocks may allocate anew: the representative keys, the block store and its tensors."""
        return (self.representatives, self.blocks, getattr(self.blocks, "keys", None))

    def _make_room(self, count: int) -> None:
        blocks = self.blocks
        if (
            self.offload == "auto"
            and not blocks.offloaded
            and not _device_has_room(self.device, blocks.bytes_to_hold(count))
        ):
            host = _HostBlocks(*self._likes, self.spec.block_size, self.max_cached_blocks)
            self.blocks = host.adopt(blocks, max(self.counts))

    def block_counts(self) -> torch.Tensor:
        """(B,) memory blocks per row, on the device (one tensor, updated in place)."""
        return self.count_tensor

    def fetch(self, selected: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, H, k * block, D) of the selected blocks (B, k); unwanted entries hold any block."""
        keys, values = self.blocks.fetch(selected, wanted)
        return keys.transpose(1, 2).flatten(2, 3), values.transpose(1, 2).flatten(2, 3)

    def fetch_into_step(self, selected: torch.Tensor, wanted: torch.Tensor) -> None:
        """`fetch`, written into the head of the step buffer (`step_slots` marks which of it is real)."""
        if not selected.shape[1]:
            return
        keys, values = self.blocks.fetch(selected, wanted)
        width = selected.shape[1] * self.spec.block_size
        for buffer, blocks in ((self.step_keys, keys), (self.step_values, values)):
            buffer[:, :, :width].unflatten(2, (selected.shape[1], -1)).copy_(blocks.transpose(1, 2))

    @property
    def offloaded(self) -> bool:
        """Whether this layer's memory blocks live in host memory."""
        return self.is_initialized and self.blocks.offloaded

    # -- a whole forward pass at once (infllm_waves) ---------------------------------------
    def recent(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, ends: list[int]) -> RecentTokens:
        """The ring's tokens and this pass's (keys/values (B, H, X, D), right-justified, `valid` (B, X))
        side by side in position order: column h of row b holds position ends[b] - ring_size - X + h.
        Init tokens are left out (they have their own slots); scores start from the ring's."""
        spec, size = self.spec, self.spec.ring_size
        total = size + keys.shape[2]
        end = on_device(ends, self.device)
        positions = end[:, None] - total + torch.arange(total, device=self.device)
        seen = (end - valid.sum(dim=1))[:, None]
        # The ring holds the positions [seen - ring_size, seen); padding columns of the pass may stand on them.
        in_ring = (positions >= spec.n_init) & (positions >= seen - size) & (positions < seen)
        slot = torch.where(in_ring, positions % size, size)
        from_pass = valid & (positions[:, size:] >= spec.n_init)
        take = from_pass[:, None, :, None]
        recent_keys = self.ring_keys.gather(2, _token_index(slot, self.ring_keys))
        recent_values = self.ring_values.gather(2, _token_index(slot, self.ring_values))
        recent_keys[:, :, size:] = torch.where(take, keys.to(self.dtype), recent_keys[:, :, size:])
        recent_values[:, :, size:] = torch.where(take, values.to(self.dtype), recent_values[:, :, size:])
        scores = self.ring_scores.gather(2, slot[:, None, :].expand(-1, keys.shape[1], -1))
        scores[:, :, size:].masked_fill_(from_pass[:, None], 0.0)
        held = in_ring.clone()
        held[:, size:] |= from_pass
        return RecentTokens(recent_keys, recent_values, scores, positions, held, ends)

    def keep_recent(self, recent: RecentTokens) -> None:
        """Store the last ring_size positions of `recent`, with the scores they have gathered, in the ring."""
        size = self.spec.ring_size
        tail = slice(recent.positions.shape[1] - size, None)
        self._store_ring(
            recent.keys[:, :, tail],
            recent.values[:, :, tail],
            recent.scores[:, :, tail],
            recent.positions[:, tail],
            recent.held[:, tail],
        )

    def blocks_to_form(self, recent: RecentTokens, targets: list[int]) -> tuple[list[int], torch.Tensor, ...]:
        """What forming each row's memory blocks up to `targets` takes, read from `recent`: the row of
        each block (in order), and their keys, values (R, H, block, D) and scores (R, H, block)."""
        spec, width = self.spec, recent.positions.shape[1]
        rows, columns = [], []
        for row, (have, want) in enumerate(zip(self.counts, targets, strict=True)):
            for block in range(have, want):
                rows.append(row)
                columns.append(spec.n_init + spec.block_size * block - (recent.ends[row] - width))
        r = on_device(rows, self.device)[:, None]
        slots = on_device(columns, self.device)[:, None]
        slots = slots + torch.arange(spec.block_size, device=self.device)
        keys = recent.keys[r, :, slots].transpose(1, 2)
        values = recent.values[r, :, slots].transpose(1, 2)
        return rows, keys, values, recent.scores[r, :, slots].transpose(1, 2)

    def fetch_many(self, selected: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B * E, H, k * block, D) of the blocks (B, E, k) selected for E execution blocks."""
        keys, values = self.blocks.fetch_each(selected, wanted)
        per_block = lambda t: t.transpose(2, 3).flatten(3, 4).flatten(0, 1)  # noqa: E731
        return per_block(keys), per_block(values)

    # -- transformers Cache API ----------------------------------------------------------------
    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        # transformers derives the next positions from this, so it counts every token seen.
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def _unsupported(self, *args, **kwargs) -> None:
        raise CacheError(
            "the InfLLM block-memory cache cannot reorder, select, repeat or crop its rows: beam search, contrastive "
            "search and assisted decoding are not supported with infllm; use greedy decoding or sampling."
        )

    reorder_cache = batch_select_indices = batch_repeat_interleave = crop = _unsupported

    def reset(self) -> None:
        self.is_initialized = False
        self.cumulative_length = 0


class BlockMemoryCache(FixedShapeDecoding, StepAwareCache):
    """A transformers `Cache` for InfLLM: a `BlockMemoryLayer` per layer (a bounded Λ layer for layers
    whose own sliding window is narrower than the local window).

    Given `form_blocks` (layer index, layer, targets per row), single-token steps can run as fixed-shape
    decode steps (`FixedShapeDecoding`): the blocks due before a token are formed on the host first, and
    the step itself reads the device state only (`in_decode_step` tells the attention so).
    """

    def __init__(
        self,
        spec: InfLLMSpec,
        layer_specs: list[InfLLMSpec | LambdaSpec],
        offload: str,
        max_cached_blocks: int,
        form_blocks: Callable[[int, BlockMemoryLayer, list[int]], None] | None = None,
    ):
        self.step = None
        self.spec = spec
        self.form_blocks = form_blocks
        self.in_decode_step = False
        # Real tokens per row counted on the device since decode steps began, and the host's counts then:
        # the host assumes one per step and reads the true count only when a block falls due.
        self._decoded: torch.Tensor | None = None
        self._decode_base: list[int] | None = None
        layers = [
            BlockMemoryLayer(s, offload, max_cached_blocks) if isinstance(s, InfLLMSpec) else LambdaCacheLayer(s, self)
            for s in layer_specs
        ]
        super().__init__(layers=layers)
        self.seen: list[int] | None = None
        self._plan: ForwardPlan | None = None
        self._plan_step: StepInfo | None = None

    def plan(self, step: StepInfo) -> ForwardPlan:
        """The layout of the forward pass in progress, computed once and shared by every layer."""
        if self._plan_step is not step:
            self._count_decoded_tokens()
            batch = step.valid.shape[0]
            seen = self.seen if self.seen is not None else [0] * batch
            if len(seen) != batch:
                raise CacheError(
                    f"this InfLLM cache holds {len(seen)} rows but a batch of {batch} was passed; "
                    "use one cache per batch (lcpatch.make_cache(model))."
                )
            self._plan, self.seen = build_plan(step, seen, self.spec)
            self._plan_step = step
        return self._plan

    def memory_blocks(self) -> list[list[int]]:
        """Memory blocks per layer and row (empty for layers without block memory)."""
        return [
            layer.counts if isinstance(layer, BlockMemoryLayer) and layer.is_initialized else []
            for layer in self.layers
        ]

    def offloaded_layers(self) -> list[int]:
        """Indices of the layers whose memory blocks live in host memory."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, BlockMemoryLayer) and layer.offloaded]

    def reset(self) -> None:
        """Forget every token, keeping the layer objects (transformers' Cache.reset contract)."""
        super().reset()
        self.seen = None
        self._plan = self._plan_step = None
        self._decoded = self._decode_base = None

    # -- fixed-shape decode steps (FixedShapeDecoding) -----------------------------------------
    @property
    def layout_version(self) -> int:
        return sum(layer.reallocations for layer in self.layers if isinstance(layer, BlockMemoryLayer))

    def begin_decode_step(self, valid: torch.Tensor) -> None:
        """Form every memory block due before this token (its first query is each row's `seen`)."""
        if self.form_blocks is None:
            raise CacheError(
                "this InfLLM cache was made without fixed-shape decode steps (make_decode_cache makes one)."
            )
        if self.seen is None:
            self.seen = [0] * valid.shape[0]
        layers = [(i, layer) for i, layer in enumerate(self.layers) if layer.is_initialized]
        if layers and any(blocks_formed(s, self.spec) > c for s, c in zip(self.seen, layers[0][1].counts, strict=True)):
            self._count_decoded_tokens()  # a host sync once per block_size tokens: exact even after padding
            targets = [blocks_formed(s, self.spec) for s in self.seen]
            for index, layer in layers:
                self.form_blocks(index, layer, targets)
        if self._decoded is None:
            self._decoded = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
            self._decode_base = list(self.seen)
        self._decoded += valid[:, 0]
        self.seen = [s + 1 for s in self.seen]
        self.in_decode_step = True

    def end_decode_step(self) -> None:
        self.in_decode_step = False

    def capture_blocker(self) -> str | None:
        if self.offloaded_layers():
            return (
                "InfLLM's memory blocks are in host memory (offload: cpu, or auto with the GPU nearly full), "
                "where each step's selection waits for the host"
            )
        return None

    def _count_decoded_tokens(self) -> None:
        """Set `seen` from the device's count of the real tokens that decode steps stored."""
        if self._decoded is not None:
            self.seen = [b + n for b, n in zip(self._decode_base, self._decoded.tolist(), strict=True)]
            self._decoded = self._decode_base = None
