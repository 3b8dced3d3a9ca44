"""One decode token per row stored in the ring cache's buffers, in one launch.

Spec: the ring cache's PyTorch write (`RingLambdaCacheLayer._write`) for one new token per row, with the window's
keys rotated as `rope` rotates them: a token among the first n_global goes to its sink slot un-rotated,
and every token to ring slot n_global + written % window, rotated at its position, with its position
and validity. The PyTorch write takes ~27 small launches per layer and token for this.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope import cos_sin, rotate
from .utils import unit_last


@triton.jit
def _ring_write_kernel(
    K,
    V,
    POS,
    VALID,
    TURNS,
    KBUF,
    VBUF,
    SLOT_POS,
    SLOT_VALID,
    WRITTEN,
    sk_b,
    sk_h,
    sv_b,
    sv_h,
    sp_b,
    sva_b,
    skb_b,
    skb_h,
    skb_s,
    svb_b,
    svb_h,
    svb_s,
    ssp_b,
    ssp_s,
    ssv_b,
    ssv_s,
    H,
    n_global,
    window,
    scale,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per row, its heads the rows of the tile; each loads the row's position and validity, so
    # that masks are built of vectors alone (the interpreter mistypes a scalar & a vector).
    b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    ok = heads < H
    first = heads == 0  # the one that writes the row's slot position and validity
    cols = tl.arange(0, HALF)[None, :]
    pos = tl.load(POS + b * sp_b + heads * 0)
    valid = tl.load(VALID + b * sva_b + heads * 0) != 0
    # Every program reads `written` before the caller advances it (a separate op, after the launch).
    ring = n_global + tl.load(WRITTEN) % window
    sink = valid & (pos >= 0) & (pos < n_global)
    sink_slot = tl.where(sink, pos, 0)  # a masked store still computes its address: keep it in bounds

    rows = heads[:, None].to(tl.int64)
    k = K + b * sk_b + rows * sk_h + cols
    x1 = tl.load(k, mask=ok[:, None], other=0.0)
    x2 = tl.load(k + HALF, mask=ok[:, None], other=0.0)
    v = V + b * sv_b + rows * sv_h + cols
    v1 = tl.load(v, mask=ok[:, None], other=0.0)
    v2 = tl.load(v + HALF, mask=ok[:, None], other=0.0)
    kb = KBUF + b * skb_b + rows * skb_h + cols
    vb = VBUF + b * svb_b + rows * svb_h + cols

    to_sink = (ok & sink)[:, None]
    tl.store(kb + sink_slot[:, None] * skb_s, x1.to(KBUF.dtype.element_ty), mask=to_sink)
    tl.store(kb + sink_slot[:, None] * skb_s + HALF, x2.to(KBUF.dtype.element_ty), mask=to_sink)
    tl.store(vb + sink_slot[:, None] * svb_s, v1.to(VBUF.dtype.element_ty), mask=to_sink)
    tl.store(vb + sink_slot[:, None] * svb_s + HALF, v2.to(VBUF.dtype.element_ty), mask=to_sink)
    tl.store(SLOT_VALID + b * ssv_b + sink_slot * ssv_s, sink.to(tl.uint8), mask=first & sink)

    # As `_rope_kernel` computes it (same ops, same order), so that both paths store the same bits.
    cos, sin = cos_sin(pos, TURNS, HALF)
    y1, y2 = rotate(x1.to(tl.float32), x2.to(tl.float32), cos, sin)
    tl.store(kb + ring * skb_s, (y1 * scale).to(KBUF.dtype.element_ty), mask=ok[:, None])
    tl.store(kb + ring * skb_s + HALF, (y2 * scale).to(KBUF.dtype.element_ty), mask=ok[:, None])
    tl.store(vb + ring * svb_s, v1.to(VBUF.dtype.element_ty), mask=ok[:, None])
    tl.store(vb + ring * svb_s + HALF, v2.to(VBUF.dtype.element_ty), mask=ok[:, None])
    tl.store(SLOT_POS + b * ssp_b + ring * ssp_s + heads * 0, pos, mask=first)
    # A sink lives in its own slot; valid in the ring too, it would be counted twice.
    ring_valid = valid & (pos >= n_global)
    tl.store(SLOT_VALID + b * ssv_b + ring * ssv_s + heads * 0, ring_valid.to(tl.uint8), mask=first)


def write_ring_token(
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    key_buffer: torch.Tensor,
    value_buffer: torch.Tensor,
    slot_positions: torch.Tensor,
    slot_valid: torch.Tensor,
    written: torch.Tensor,
    n_global: int,
    turns: torch.Tensor,
    scale: float,
) -> None:
    """Store key/value (B, H, 1, D) of positions/valid (B, 1) in the buffers (B, H, n_global + window, D) and
    slot_positions/slot_valid (B, n_global + window), as the ring cache's `_write` does. `written` (0-dim,
    on the device) picks the ring slot and is left as it is; `turns` is `frequency_turns` of the D/2
    frequencies, `scale` the rotary's."""
    batch, heads, _, dim = key.shape
    key, value = unit_last(key, value)
    valid, flags = valid.view(torch.uint8), slot_valid.view(torch.uint8)
    _ring_write_kernel[(batch,)](
        key,
        value,
        positions,
        valid,
        turns,
        key_buffer,
        value_buffer,
        slot_positions,
        flags,
        written,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        positions.stride(0),
        valid.stride(0),
        key_buffer.stride(0),
        key_buffer.stride(1),
        key_buffer.stride(2),
        value_buffer.stride(0),
        value_buffer.stride(1),
        value_buffer.stride(2),
        slot_positions.stride(0),
        slot_positions.stride(1),
        flags.stride(0),
        flags.stride(1),
        heads,
        n_global,
        key_buffer.shape[2] - n_global,
        scale,
        HALF=dim // 2,
        BLOCK_H=triton.next_power_of_2(heads),
        num_warps=4,
    )
