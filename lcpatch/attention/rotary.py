"""RoPE applied at positions that the attention method chooses (not the model's own positions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        cos, sin = cos[:, None], sin[:, None]
        x = x.to(torch.float32)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = self.dim // 2
        rotated = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
