"""Λ cache with static shapes, for decoding in a CUDA graph: fixed sink slots + a ring buffer for the window.

It holds what LambdaCache holds (n_global sink slots, the last `window` tokens, with their positions
and validity), but every tensor is allocated once and written in place: token number t of the stream
goes to window slot t % window. A decode step (one new token per row) then has the same shapes and
addresses at every step, which a captured CUDA graph needs. Slot order is no longer stream order, so
attention must go by positions and validity alone (`keys_in_stream_order`).

The window's keys are stored rotated at their positions (`Rotary.rotate_stored`, once per token as
it is written): Λ only ever scores them at their true distance, so the decode kernel reads them as
flash-decoding does, without rotating ~4k keys per head, layer and step; the sinks, which Λ also
scores at a capped distance, stay un-rotated. A prefill chunk gets the window rotated back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.specs import LambdaSpec, Rotary, StepInfo
from .lambda_cache import LambdaCache, LambdaCacheLayer
from .step import FixedShapeDecoding

# (keys, positions, rotary, inverse) -> the keys rotated as `Rotary.rotate_stored` does, in their dtype:
# an attention backend's `rotate_stored`.
KeyRotation = Callable[[torch.Tensor, torch.Tensor, Rotary, bool], torch.Tensor]
# (key, value, positions, valid, key_buffer, value_buffer, slot_positions, slot_valid, written, n_global, rotary)
# -> whether it stored one new token per row as `_write` does, `written` left as it is (False: nothing
# written, `_write`'s PyTorch code runs): an attention backend's `write_ring_token`.
TokenWrite = Callable[..., bool]


class RingLambdaCacheLayer(LambdaCacheLayer):
    """One layer: slots [0, n_global) hold the sinks (slot = position), [n_global, n_global + window) the ring."""

    def __init__(self, spec: LambdaSpec, owner: RingLambdaCache, rotary: Rotary):
        super().__init__(spec, owner)
        self.rotary = rotary
        # Layers of one spec store the same tokens, so they share one count of them (`written`): the first
        # of them makes it, the last advances it, once per step rather than once per layer.
        self.first_of_spec = self.last_of_spec = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        g, w = self.spec.n_global, self.spec.window
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_zeros(batch, heads, g + w, dim)
        self.value_buffer = value_states.new_zeros(batch, heads, g + w, value_states.shape[-1])
        self.slot_positions = torch.arange(g + w, device=self.device).repeat(batch, 1)  # ring slots: set when written
        self.slot_valid = torch.zeros(batch, g + w, dtype=torch.bool, device=self.device)
        # Tokens written so far, on the device: a captured step reads and advances it without the host.
        if self.first_of_spec or self.spec not in self.owner.written:
            self.owner.written[self.spec] = torch.zeros((), dtype=torch.long, device=self.device)
        self.written = self.owner.written[self.spec]
        self.sink_slots = torch.arange(g, device=self.device)
        self.ring_offsets = torch.arange(w, device=self.device)
        self.is_initialized = True
        self.owner.layout_version += 1  # new addresses: a captured step must be captured again

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self.current_step(key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:
            # Decode: store, then attend over the whole fixed buffer. The token the write evicts is
            # `window` tokens back, outside the window of the new query, so it is not missed.
            self._write(key_states, value_states, step)
            keys, values = self.key_buffer, self.value_buffer
            self.key_positions, self.key_valid = self.slot_positions, self.slot_valid
            self.keys_in_stream_order = False
            self.rotated_from = self.spec.n_global
        else:
            # A prefill chunk's first queries see tokens that its later tokens evict: attend over the
            # window unrolled into stream order plus the chunk (LambdaCache's layout), then store.
            order, cached_positions, self.key_positions, self.key_valid = self._unrolled(step)
            g = self.spec.n_global
            cached = self.key_buffer.index_select(2, order)
            window = self.owner.rotate_keys(cached[:, :, g:], cached_positions[:, g:], self.rotary, True)
            keys = torch.cat((cached[:, :, :g], window, key_states), dim=-2)
            values = torch.cat((self.value_buffer.index_select(2, order), value_states), dim=-2)
            self.keys_in_stream_order = True
            self.rotated_from = None
            self._write(key_states, value_states, step)
        self.key_step = step
        self.cumulative_length += key_states.shape[-2]
        return keys, values

    def _unrolled(self, step: StepInfo) -> tuple[torch.Tensor, ...]:
        """The slots in stream order, their positions, and the positions and validity of the keys a prefill chunk
        attends to. Layers of one spec that have stored the same steps hold the same positions: they share
        these tensors, so that an attention backend that reads positions on the host (flash-attention's
        layout) does so once per chunk, not once per layer."""
        shared = self.owner.unrolled.get(self.spec)
        if shared is not None and shared[0] is step and shared[1] == self.cumulative_length:
            return shared[2]
        # Only the ring slots written so far (all once it has wrapped): LambdaCache's layout, and no run of
        # empty slots between the sinks and a first chunk longer than the window, whose global tokens
        # would then sit ~window slots in (the flash engine scores every slot up to the last global at once).
        held = min(self.cumulative_length, self.spec.window)
        ring = self.spec.n_global + (self.written + self.ring_offsets[self.spec.window - held :]) % self.spec.window
        order = torch.cat((self.sink_slots, ring))
        cached_positions = self.slot_positions.index_select(1, order)
        found = (
            order,
            cached_positions,
            torch.cat((cached_positions, step.positions), dim=1),
            torch.cat((self.slot_valid.index_select(1, order), step.valid), dim=1),
        )
        self.owner.unrolled[self.spec] = (step, self.cumulative_length, found)
        return found

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, step: StepInfo) -> None:
        """Store the new tokens in place: sinks in their slots, the last `window` of them in the ring.

        A decode step (one token per row) goes to the backend's `write_token` where it takes the tensors: one
        launch, the same bits; the code below is its spec."""
        g, w = self.spec.n_global, self.spec.window
        length = key_states.shape[-2]
        if length == 1 and self._write_token(key_states, value_states, step):
            self._advance(1)
            return
        is_sink = step.valid & (step.positions < g)
        if g:
            self._write_sinks(key_states, value_states, step)
        kept = min(length, w)  # of a chunk longer than the window only its last `window` tokens stay
        slots = g + (self.written + (length - kept) + self.ring_offsets[:kept]) % w
        rotated = self.owner.rotate_keys(key_states[:, :, -kept:], step.positions[:, -kept:], self.rotary, False)
        self.key_buffer.index_copy_(2, slots, rotated)
        self.value_buffer.index_copy_(2, slots, value_states[:, :, -kept:])
        self.slot_positions.index_copy_(1, slots, step.positions[:, -kept:])
        # A sink lives in its own slot; valid in the ring too, it would be counted twice.
        self.slot_valid.index_copy_(1, slots, (step.valid & ~is_sink)[:, -kept:])
        self._advance(length)

    def _advance(self, length: int) -> None:
        """Count `length` stored tokens, once for the layers of this spec: the layers before this one have
        stored them at the count before."""
        if self.last_of_spec:
            self.written += length

    def _write_token(self, key_states: torch.Tensor, value_states: torch.Tensor, step: StepInfo) -> bool:
        """The backend's write of one token per row (one launch), where it takes these tensors."""
        stored = (self.key_buffer, self.value_buffer, self.slot_positions, self.slot_valid, self.written)
        args = (key_states, value_states, step.positions, step.valid, *stored, self.spec.n_global, self.rotary)
        return self.owner.write_token(*args)

    def _write_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor, step: StepInfo) -> None:
        # Without a host sync: each sink slot takes the chunk's token at its position, if there is one.
        g = self.spec.n_global
        hit = step.valid[:, :, None] & (step.positions[:, :, None] == self.sink_slots)  # (B, L, g)
        found = hit.any(dim=1)
        source = hit.to(torch.uint8).argmax(dim=1)[:, None, :, None]  # token index per sink slot (B, 1, g, 1)
        for buffer, states in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
            picked = states.gather(2, source.expand(-1, states.shape[1], -1, states.shape[-1]))
            buffer[:, :, :g] = torch.where(found[:, None, :, None], picked, buffer[:, :, :g])
        self.slot_valid[:, :g] |= found

    def batch_size(self) -> int:
        return self.key_buffer.shape[0]

    def stored_length(self) -> int:
        """Key/value slots allocated: n_global + window from the first token on."""
        return self.spec.cache_size if self.is_initialized else 0

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        for name in ("key_buffer", "value_buffer", "slot_positions", "slot_valid"):
            tensor = getattr(self, name)
            picked = tensor.index_select(0, index)
            if picked.shape == tensor.shape:
                tensor.copy_(picked)  # in place (beam reordering): a captured step keeps its addresses
            else:
                setattr(self, name, picked)
                self.owner.layout_version += 1


class RingLambdaCache(FixedShapeDecoding, LambdaCache):
    """A LambdaCache whose tensors keep their shapes and addresses from the first token on."""

    layer_class = RingLambdaCacheLayer

    def __init__(
        self, specs: list[LambdaSpec], rotaries: list[Rotary], rotate_keys: KeyRotation, write_token: TokenWrite
    ):
        self.layout_version = 0  # bumped whenever a layer (re)allocates its tensors
        self.rotaries = rotaries  # each layer stores its window's keys rotated by its own
        # The attention backend's: one Triton launch per layer and step on a GPU, not ~15 small PyTorch ops.
        self.rotate_keys = rotate_keys
        # Also the backend's: a decode step's whole write in one launch, not ~27 (the torch backend declines).
        self.write_token = write_token
        # Per spec: the step, tokens stored before it, and `RingLambdaCacheLayer._unrolled`'s tensors for it.
        self.unrolled: dict[LambdaSpec, tuple] = {}
        # Per spec: the tokens its layers have stored (`RingLambdaCacheLayer.written`), on the device.
        self.written: dict[LambdaSpec, torch.Tensor] = {}
        super().__init__(specs)

    def make_layers(self, specs: list[LambdaSpec]) -> list[RingLambdaCacheLayer]:
        layers = [self.layer_class(spec, self, rotary) for spec, rotary in zip(specs, self.rotaries, strict=True)]
        for index, layer in enumerate(layers):
            layer.first_of_spec = all(other.spec != layer.spec for other in layers[:index])
            layer.last_of_spec = all(other.spec != layer.spec for other in layers[index + 1 :])
        return layers
