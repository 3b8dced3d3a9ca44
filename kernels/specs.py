"""The values that attention methods, caches and kernels all read: plain frozen dataclasses on torch.

`LambdaSpec` and `InfLLMSpec` are one layer's attention rule with every value resolved, `Rotary` one
layer's RoPE frequencies, `StepInfo` the positions of the tokens a forward pass is adding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LambdaSpec:
    """The Λ rule of one layer: which (query, key) pairs are visible and at which rotary positions.

    A query at absolute position i sees key j iff j <= i and (j < n_global or i - j < window).
    Inside the window the rotary distance is the true one, i - j. Outside it (only the n_global
    first tokens are visible there), LM-Infinite caps the distance at `max_distance`, while
    StreamingLLM (`max_distance` None) rotates the pair at its positions inside the bounded cache:
    the query at min(i, n_global + window - 1), the key at j.
    """

    n_global: int
    window: int
    max_distance: int | None  # None: StreamingLLM's in-cache positions

    @property
    def cache_size(self) -> int:
        return self.n_global + self.window

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = q_pos - k_pos
        return (distance >= 0) & ((k_pos < self.n_global) | (distance < self.window))

    def in_window(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return (q_pos - k_pos) < self.window

    def far_query_position(self, q_pos: torch.Tensor) -> torch.Tensor:
        """Rotary position of a query for pairs outside the window."""
        if self.max_distance is not None:
            return torch.full_like(q_pos, self.max_distance)
        return q_pos.clamp(max=self.n_global + self.window - 1)

    def far_key_position(self, k_pos: torch.Tensor) -> torch.Tensor:
        """Rotary position of a key for pairs outside the window."""
        if self.max_distance is not None:
            return torch.zeros_like(k_pos)
        return k_pos


@dataclass(frozen=True)
class InfLLMSpec:
    """The InfLLM rule of one layer, with every value resolved."""

    n_init: int
    n_local: int
    block_size: int
    repr_topk: int
    topk: int
    exc_block_size: int

    @property
    def ring_size(self) -> int:
        """Slots that always hold the tokens not yet in a memory block (window + forming block + one exc block)."""
        return self.n_local + self.block_size + self.exc_block_size - 1


@dataclass(frozen=True)
class Rotary:
    """The rotary frequencies of one layer, read from the model's own rotary embedding module.

    `scale` is transformers' `attention_scaling` (e.g. YaRN's mscale), applied to cos and sin alike.
    Dimensions past `2 * len(inv_freq)` are not rotated (partial rotary, e.g. Phi-3 variants).
    """

    inv_freq: torch.Tensor
    scale: float = 1.0

    @property
    def dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (*positions.shape, dim) in fp32, in transformers' half-split layout."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device, torch.float32)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, L, D) by RoPE at `positions` (B, L) (any integers, negative too); returns fp32."""
        cos, sin = self.cos_sin(positions)
        return self._apply(x, cos, sin)

    def rotate_stored(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """`rotate` for keys a cache stores rotated: the angle reduced modulo a turn in float64 first, so that
        a key at position 10^6 is rotated as precisely as one at 10 (fp32 angles are off by ~0.06 rad there).
        `inverse` undoes it (the transpose, over `scale`). Returns fp32."""
        turns = positions.to(torch.float64)[..., None] * (
            self.inv_freq.to(positions.device, torch.float64) / (2 * math.pi)
        )
        angles = ((turns - turns.round()) * (2 * math.pi)).to(torch.float32)
        emb = torch.cat((angles, angles), dim=-1)
        scale = 1.0 / self.scale if inverse else self.scale
        return self._apply(x, emb.cos() * scale, emb.sin() * (-scale if inverse else scale))

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos[:, None], sin[:, None]
        x = x.to(torch.float32)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = self.dim // 2
        rotated = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


@dataclass(frozen=True)
class StepInfo:
    """Positions (B, L) and validity (B, L) of the tokens of the forward pass in progress."""

    positions: torch.Tensor
    valid: torch.Tensor
