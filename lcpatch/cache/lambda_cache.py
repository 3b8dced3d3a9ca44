"""Bounded KV cache for Λ attention: `n_global` sink slots + the last `window` tokens, per layer.

Keys are stored un-rotated, with their absolute positions and a validity flag (padding and
not-yet-seen sinks are invalid), so that attention can rotate each pair at the distance its
method chooses. A layer never holds more than `n_global + window` positions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..errors import CacheError
from ..kernels.specs import LambdaSpec, StepInfo
from .step import StepAwareCache


class LambdaCacheLayer(CacheLayerMixin):
    """One layer: sink slots indexed by position (0..n_global-1), then a window in stream order."""

    is_sliding = False
    # Keys come back sinks, window, new tokens: slot order is stream order (Λ attention may slice by slot).
    keys_in_stream_order = True
    # The slot from which the keys returned come rotated at their positions (None: all un-rotated).
    rotated_from: int | None = None

    def __init__(self, spec: LambdaSpec, owner: LambdaCache):
        super().__init__()
        self.spec = spec
        self.owner = owner
        self.cumulative_length = 0
        # Positions and validity of the keys returned by the last `update`, read by attention.
        self.key_positions: torch.Tensor | None = None
        self.key_valid: torch.Tensor | None = None
        self.key_step: StepInfo | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        g = self.spec.n_global
        self.dtype, self.device = key_states.dtype, key_states.device
        self.sink_keys = key_states.new_zeros(batch, heads, g, dim)
        self.sink_values = value_states.new_zeros(batch, heads, g, value_states.shape[-1])
        self.sink_valid = torch.zeros(batch, g, dtype=torch.bool, device=self.device)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.window_positions = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.window_valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def current_step(self, key_states: torch.Tensor) -> StepInfo:
        """Positions and validity of the tokens being stored, recorded by the runtime for this forward."""
        step = self.owner.step
        if step is None or tuple(step.positions.shape) != (key_states.shape[0], key_states.shape[2]):
            raise CacheError(
                "LambdaCache was updated outside a forward pass of the model it was made for "
                "(no token positions were recorded). Let the patched model create its own cache, "
                "or pass one from lcpatch.make_cache(model)."
            )
        return step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self.current_step(key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        g = self.spec.n_global
        sink_positions = torch.arange(g, device=self.device).expand(step.positions.shape[0], g)
        keys = torch.cat((self.sink_keys, self.keys, key_states), dim=-2)
        values = torch.cat((self.sink_values, self.values, value_states), dim=-2)
        self.key_positions = torch.cat((sink_positions, self.window_positions, step.positions), dim=1)
        self.key_valid = torch.cat((self.sink_valid, self.window_valid, step.valid), dim=1)
        self.key_step = step

        # Sinks are copied into their slots once; in the window they would be counted twice.
        is_sink = step.valid & (step.positions < g)
        if is_sink.any():
            b, t = is_sink.nonzero(as_tuple=True)
            slot = step.positions[b, t]
            self.sink_keys[b, :, slot] = key_states[b, :, t].to(self.sink_keys.dtype)
            self.sink_values[b, :, slot] = value_states[b, :, t].to(self.sink_values.dtype)
            self.sink_valid[b, slot] = True
        w = self.spec.window
        self.keys = torch.cat((self.keys, key_states), dim=-2)[:, :, -w:]
        self.values = torch.cat((self.values, value_states), dim=-2)[:, :, -w:]
        self.window_positions = torch.cat((self.window_positions, step.positions), dim=1)[:, -w:]
        self.window_valid = torch.cat((self.window_valid, step.valid & ~is_sink), dim=1)[:, -w:]
        self.cumulative_length += key_states.shape[-2]
        return keys, values

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.spec.n_global + self.stored_length() + query_length, 0

    def stored_length(self) -> int:
        """Key/value positions held now (sink slots included): never above n_global + window."""
        if not self.is_initialized:
            return 0
        return self.spec.n_global + self.keys.shape[-2]

    def get_seq_length(self, *args, **kwargs) -> int:
        # transformers derives the next positions from this, so it counts every token seen.
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.spec.cache_size

    def get_max_cache_shape(self) -> int:
        return self.spec.cache_size

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for name in ("sink_keys", "sink_values", "keys", "values"):
            setattr(self, name, getattr(self, name).index_select(0, index.to(self.device)))
        for name in ("sink_valid", "window_positions", "window_valid"):
            setattr(self, name, getattr(self, name).index_select(0, index.to(self.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(torch.as_tensor(indices, device=self.device).reshape(-1))

    def batch_size(self) -> int:
        return self.sink_keys.shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self.batch_size(), device=self.device)
            self._select_batch(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise CacheError(
            "LambdaCache cannot be cropped: tokens evicted from the window are gone. "
            "Assisted / speculative decoding is not supported with Λ attention; use plain sampling or greedy."
        )

    def reset(self) -> None:
        self.is_initialized = False
        self.cumulative_length = 0
        self.key_positions = self.key_valid = self.key_step = None


class LambdaCache(StepAwareCache):
    """A transformers `Cache` holding at most `n_global + window` key/value positions per layer."""

    layer_class = LambdaCacheLayer

    def __init__(self, specs: list[LambdaSpec]):
        self.step = None
        super().__init__(layers=self.make_layers(specs))

    def make_layers(self, specs: list[LambdaSpec]) -> list[LambdaCacheLayer]:
        return [self.layer_class(spec, self) for spec in specs]

    def stored_lengths(self) -> list[int]:
        """Key/value positions held per layer now."""
        return [layer.stored_length() for layer in self.layers]
