"""RoPE inside the Λ kernels: cos/sin from integer positions, in transformers' half-split layout.

Tensors are handled as two halves (columns [0, D/2) and [D/2, D)), so rotating, and rotating
back a gradient accumulator, never needs a column permutation in registers.

The angle is reduced modulo one turn in float64 before the float32 cos/sin. A query or key at
position 100,000 is then rotated as precisely as one at position 10, so rotating both at their
absolute positions gives the scores of the reference (which rotates relative to a nearby origin to
stay precise in float32) while each key is rotated once per call rather than once per query block.
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .utils import grid_rows, interpreting

# Angles reach cos/sin already reduced to [-π, π), where the hardware approximations are accurate
# to ~5e-7; the precise versions would add a large-argument path to every kernel (and registers).
# The interpreter has no libdevice.
FAST_TRIG: tl.constexpr = tl.constexpr(not interpreting())

_TURNS_CACHE: dict[tuple[int, str], tuple[weakref.ref, int, torch.Tensor]] = {}


def frequency_turns(inv_freq: torch.Tensor, device: torch.device) -> torch.Tensor:
    """inv_freq / 2π in float64 on `device`: the kernels' angle, in turns, is position · this.

    Cached per tensor object (a model's inv_freq buffer lives as long as the model), checked by a
    weak reference and the tensor's version, so a new tensor at a reused address never hits.
    """
    key = (id(inv_freq), str(device))
    entry = _TURNS_CACHE.get(key)
    if entry is not None and entry[0]() is inv_freq and entry[1] == inv_freq._version:
        return entry[2]
    if len(_TURNS_CACHE) > 64:
        _TURNS_CACHE.clear()
    turns = inv_freq.detach().to(device=device, dtype=torch.float64) / (2 * math.pi)
    _TURNS_CACHE[key] = (weakref.ref(inv_freq), inv_freq._version, turns)
    return turns


@triton.jit
def cos_sin(pos, TURNS, HALF: tl.constexpr):
    """cos and sin (R, HALF), float32, of positions `pos` (R,) times each rotary frequency."""
    turns = tl.load(TURNS + tl.arange(0, HALF))
    t = pos.to(tl.float64)[:, None] * turns[None, :]
    angle = (t - tl.floor(t + 0.5)).to(tl.float32) * 6.283185307179586
    if FAST_TRIG:
        return libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
    else:
        return tl.cos(angle), tl.sin(angle)


@triton.jit
def rotate(x1, x2, cos, sin):
    """Rotate the halves (x1, x2) by the angles of cos/sin; pass -sin to apply the transpose."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_kernel(
    X,
    POS,
    TURNS,
    OUT,
    OUT_FAR,
    ADD,
    sx_b,
    sx_h,
    sx_l,
    sp_b,
    sp_l,
    so_b,
    so_h,
    so_l,
    H,
    L,
    far_pos,
    scale,
    far_scale,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    FAR: tl.constexpr,
    CAPPED: tl.constexpr,
    INVERSE: tl.constexpr,
    ADDS: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs = pid_l * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    offs_h = tl.arange(0, HALF)
    pos = tl.load(POS + b.to(tl.int64) * sp_b + offs * sp_l, mask=ok, other=0).to(tl.int32)
    x_ptr = X + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h + offs[:, None].to(tl.int64) * sx_l + offs_h[None, :]
    x1 = tl.load(x_ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=ok[:, None], other=0.0).to(tl.float32)
    out = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + offs[:, None].to(tl.int64) * so_l + offs_h[None, :]

    cos, sin = cos_sin(pos, TURNS, HALF)
    if INVERSE:  # the transpose of the rotation: how a gradient goes back through it
        sin = -sin
    y1, y2 = rotate(x1, x2, cos, sin)
    y1 = y1 * scale
    y2 = y2 * scale
    if ADDS:  # another gradient of the same tensor, in OUT's layout
        y1 += tl.load(ADD + out, mask=ok[:, None], other=0.0).to(tl.float32)
        y2 += tl.load(ADD + out + HALF, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + out, y1.to(OUT.dtype.element_ty), mask=ok[:, None])
    tl.store(OUT + out + HALF, y2.to(OUT.dtype.element_ty), mask=ok[:, None])
    if FAR:
        if CAPPED:
            fpos = pos * 0 + far_pos
        else:
            fpos = tl.minimum(pos, far_pos)
        cos, sin = cos_sin(fpos, TURNS, HALF)
        y1, y2 = rotate(x1, x2, cos, sin)
        tl.store(OUT_FAR + out, (y1 * far_scale).to(OUT_FAR.dtype.element_ty), mask=ok[:, None])
        tl.store(OUT_FAR + out + HALF, (y2 * far_scale).to(OUT_FAR.dtype.element_ty), mask=ok[:, None])


def rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    turns: torch.Tensor,
    scale: float,
    far: tuple[int, float, bool] | None = None,
    seq_major: bool = False,
    inverse: bool = False,
    add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate x (B, H, L, D) at `positions` (B, L); returns a copy (B, H, L, D) in x's dtype.

    The copy is contiguous, or with seq_major a view of a contiguous (B, L, H, D) tensor: the layout
    flash-attention reads, and the one transformers' projections give q and k. `inverse` rotates by
    minus the angles (a gradient going back through the rotation); `add` (B, H, L, D), a tensor in
    the copy's layout, is added to the result (a second gradient of the same tensor).
    With far = (far_pos, far_scale, capped), also returns x rotated at the Λ rule's far query
    position (far_pos for LM-Infinite, min(position, far_pos) for StreamingLLM) times far_scale.
    """
    batch, heads, length, dim = x.shape
    if seq_major:
        out = torch.empty(batch, length, heads, dim, dtype=x.dtype, device=x.device).transpose(1, 2)
    else:
        out = torch.empty(batch, heads, length, dim, dtype=x.dtype, device=x.device)
    out_far = torch.empty_like(out) if far is not None else out
    if add is not None and add.stride() != out.stride():
        add = torch.empty_like(out).copy_(add)  # same strides as out: the kernel reads both at one offset
    far_pos, far_scale, capped = far if far is not None else (0, 1.0, False)
    block = 32 if interpreting() else 64
    _rope_kernel[grid_rows(length, block, batch * heads)](
        x,
        positions,
        turns,
        out,
        out_far,
        add if add is not None else out,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        positions.stride(0),
        positions.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        heads,
        length,
        far_pos,
        scale,
        far_scale,
        HALF=dim // 2,
        BLOCK=block,
        FAR=far is not None,
        CAPPED=capped,
        INVERSE=inverse,
        ADDS=add is not None,
        num_warps=4,
    )
    return out, (out_far if far is not None else None)


@triton.jit
def rotated_rows(row_ptr, ok, pos, TURNS, far_pos, rot_scale, q_scale, HALF: tl.constexpr, CAPPED: tl.constexpr):
    """Load rows (R, 2·HALF) at `row_ptr` (R,) and return them rotated, as halves in their dtype,
    times q_scale: at `pos` (near pairs) and at the Λ rule's far query position (far pairs).

    The far halves carry the key side's far rotation too where it is position-independent
    (LM-Infinite: keys at position 0, i.e. multiplied by rot_scale).
    """
    offs_h = tl.arange(0, HALF)
    x1 = tl.load(row_ptr[:, None] + offs_h[None, :], mask=ok[:, None], other=0.0)
    x2 = tl.load(row_ptr[:, None] + HALF + offs_h[None, :], mask=ok[:, None], other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    cos, sin = cos_sin(pos, TURNS, HALF)
    near_scale = rot_scale * q_scale
    n1 = ((x1 * cos - x2 * sin) * near_scale).to(dtype)
    n2 = ((x2 * cos + x1 * sin) * near_scale).to(dtype)
    if CAPPED:
        cos, sin = cos_sin(pos * 0 + far_pos, TURNS, HALF)
        far_scale = near_scale * rot_scale
    else:
        cos, sin = cos_sin(tl.minimum(pos, far_pos), TURNS, HALF)
        far_scale = near_scale
    f1 = ((x1 * cos - x2 * sin) * far_scale).to(dtype)
    f2 = ((x2 * cos + x1 * sin) * far_scale).to(dtype)
    return n1, n2, f1, f2
