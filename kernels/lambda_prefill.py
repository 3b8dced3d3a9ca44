"""Λ attention for prefill and training: Triton forward and backward, launcher, autograd.Function.

Spec: `lambda_reference.lambda_attention_reference` beside it (differentiable PyTorch).

Keys are rotated once per call at their absolute positions (`rope.py`), queries inside the kernels.
A query block covering key slots [s0, s1) (queries are the last Lq key slots) visits only

- prefix blocks, slots [0, P), P = 1 + the last slot holding a valid global token: pairs beyond
  the window are scored with the method's far rotary positions (two dot products there);
- window blocks, slots [max(P, s0 - window + 1), s1): in-window pairs only, one dot product;

so the cost is O(Lq · (window + P)). Inside a block the mask is spec.visible on positions and
key_valid, exactly as in the reference, which also assumes that a key the position rule shows to a
query lies in its slot window (LambdaCache and plain prefill lay keys out in stream order). Window
tiles that every query of the block sees whole (known from per-tile position bounds computed by
the launcher) skip the mask altogether: that is most of them when window >> block.

Layouts. q, k, v (B, H, L, D) and the output's gradient (B, Lq, Hq, D) are read where the caller
keeps them (transformers hands q/k/v over as transposed views, the Λ cache keeps its own layout), so
the kernels take their strides: (b, h, l) for q/k/v, (b, l, h) for the gradient, and the batch
stride of positions and validity (B, L). Every last dim has unit stride. What the launchers allocate
is contiguous and addressed from its shape: the rotated q and k (B, H, L, D), the output and dq in
(B, Lq, Hq, D) memory, lse and delta (B, Hq, Lq), dk and dv (B, Hkv, Lk, D), the tile bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope import cos_sin, frequency_turns, rope, rotate, rotated_rows
from .specs import LambdaSpec, Rotary
from .utils import LOG2E, dot_precision, interpreting, tanh, unit_last


def far_rule(spec: LambdaSpec) -> tuple[bool, int]:
    """(capped, far query position): LM-Infinite's max_distance, or StreamingLLM's last cache slot."""
    if spec.max_distance is not None:
        return True, spec.max_distance
    return False, spec.n_global + spec.window - 1


def prefix_length(key_positions: torch.Tensor, key_valid: torch.Tensor, n_global: int) -> torch.Tensor:
    """P (int32, on the device, so that the forward never waits for the host)."""
    if n_global == 0:
        return torch.zeros((), dtype=torch.int32, device=key_valid.device)
    holds = (key_valid & (key_positions < n_global)).any(dim=0)
    slots = torch.arange(1, holds.numel() + 1, device=holds.device, dtype=torch.int32)
    return (slots * holds).max()


def block_bounds(positions: torch.Tensor, valid: torch.Tensor | None, block: int) -> torch.Tensor:
    """(B, blocks, 2) int32: min and max position of each `block`-slot tile, an invalid slot
    counting as -2^30 for the min and 2^30 for the max, so that such a tile never looks whole."""
    batch, length = positions.shape
    big = 1 << 30
    low, high = positions, positions
    if valid is not None:
        low, high = positions.masked_fill(~valid, -big), positions.masked_fill(~valid, big)
    pad = triton.cdiv(length, block) * block - length
    low = torch.nn.functional.pad(low, (0, pad), value=-big).reshape(batch, -1, block).amin(-1)
    high = torch.nn.functional.pad(high, (0, pad), value=big).reshape(batch, -1, block).amax(-1)
    return torch.stack((low, high), dim=-1).to(torch.int32)


# -- forward ---------------------------------------------------------------------------------------


@triton.jit
def _fwd_blocks(
    acc, m_i, l_i, q1, q2, qf1, qf2, qp, q_slot, q_lo, q_hi, KN, KF, V, KPOS, KVALID, BOUNDS, skf_l, sv_l, lo, hi,
    n_global, window, scaling, softcap,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, FAR: tl.constexpr, CAPPED: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Online softmax over key slots [lo, hi). q is pre-scaled by scaling·log2(e) unless SOFTCAP.

    FAR: prefix slots, always masked. Otherwise window slots, in BLOCK_N-aligned tiles: a tile
    whose precomputed position bounds (BOUNDS) show every key visible to every query of the block
    (query positions in [q_lo, q_hi]) skips the mask and the loads of positions and validity.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, 2 * HALF)
    first = lo
    if not FAR:
        lo = lo // BLOCK_N * BLOCK_N
        # Bounds of the next tile are loaded one iteration ahead, off the critical path.
        next_min = tl.load(BOUNDS + (lo // BLOCK_N) * 2, mask=lo < hi, other=0)
        next_max = tl.load(BOUNDS + (lo // BLOCK_N) * 2 + 1, mask=lo < hi, other=0)
    for start in range(lo, hi, BLOCK_N):
        k_rows = KN + (start + offs_n0)[:, None] * (2 * HALF) + offs_h[None, :]
        n_ok = start + offs_n0 < hi
        k1 = tl.load(k_rows, mask=n_ok[:, None], other=0.0)
        k2 = tl.load(k_rows + HALF, mask=n_ok[:, None], other=0.0)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        if FAR:
            offs_n = start + offs_n0
            kp = tl.load(KPOS + offs_n, mask=n_ok, other=0).to(tl.int32)
            valid = (tl.load(KVALID + offs_n, mask=n_ok, other=0) != 0) & n_ok
            d = qp[:, None] - kp[None, :]
            if CAPPED:
                f_rows = KF + start * skf_l + offs_n0[:, None] * skf_l + offs_h[None, :]
                f1 = tl.load(f_rows, mask=n_ok[:, None], other=0.0)
                f2 = tl.load(f_rows + HALF, mask=n_ok[:, None], other=0.0)
            else:
                f1 = k1
                f2 = k2
            sf = tl.dot(qf1, tl.trans(f1), input_precision=DOT_PREC)
            sf = tl.dot(qf2, tl.trans(f2), sf, input_precision=DOT_PREC)
            s = tl.where(d < window, s, sf)
            if SOFTCAP:
                s = tanh(s * (scaling / softcap)) * (softcap * LOG2E)
            vis = (valid[None, :] & (offs_n[None, :] <= q_slot[:, None])) & (d >= 0)
            vis = vis & ((d < window) | (kp[None, :] < n_global))
            z = tl.where(vis, s, float("-inf"))
        else:
            k_min = next_min
            k_max = next_max
            more = start + BLOCK_N < hi
            next_min = tl.load(BOUNDS + (start // BLOCK_N + 1) * 2, mask=more, other=0)
            next_max = tl.load(BOUNDS + (start // BLOCK_N + 1) * 2 + 1, mask=more, other=0)
            if SOFTCAP:
                s = tanh(s * (scaling / softcap)) * (softcap * LOG2E)
            whole = (start >= first) & (start + BLOCK_N <= hi)
            if whole & (q_lo - k_max >= 0) & (q_hi - k_min < window):
                z = s
            else:
                offs_n = start + offs_n0
                kp = tl.load(KPOS + offs_n, mask=n_ok, other=0).to(tl.int32)
                valid = tl.load(KVALID + offs_n, mask=n_ok, other=0) != 0
                d = qp[:, None] - kp[None, :]
                vis = (valid & n_ok & (offs_n >= first))[None, :] & (d >= 0) & (d < window)
                z = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = V + start * sv_l + offs_n0[:, None] * sv_l + offs_d[None, :]
        v = tl.load(v_rows, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _lambda_fwd(
    Q, KN, KF, V, OUT, LSE, QPOS, KPOS, KVALID, BOUNDS, PREFIX, TURNS,
    sq_b, sq_h, sq_l, skf_b, skf_h, skf_l, sv_b, sv_h, sv_l, sqp_b, skp_b, skv_b,
    Hq, Lq, Lk, group, n_global, window, far_pos, rot_scale, scaling, softcap,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, CAPPED: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // group).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    qp = tl.load(QPOS + b * sqp_b + offs_m, mask=m_ok, other=0).to(tl.int32)
    q_rows = Q + b * sq_b + h.to(tl.int64) * sq_h + offs_m.to(tl.int64) * sq_l
    if SOFTCAP:
        q_scale = 1.0
    else:
        q_scale = scaling * LOG2E
    q1, q2, qf1, qf2 = rotated_rows(q_rows, m_ok, qp, TURNS, far_pos, rot_scale, q_scale, HALF, CAPPED)
    q_lo = tl.min(tl.where(m_ok, qp, 1 << 30), 0)
    q_hi = tl.max(tl.where(m_ok, qp, -(1 << 30)), 0)
    q_slot = Lk - Lq + offs_m

    KN = KN + (b * (Hq // group) + hk) * Lk * (2 * HALF)
    KF = KF + b * skf_b + hk * skf_h
    V = V + b * sv_b + hk * sv_h
    KPOS = KPOS + b * skp_b
    KVALID = KVALID + b * skv_b
    BOUNDS = BOUNDS + b * tl.cdiv(Lk, BLOCK_N) * 2
    prefix = tl.load(PREFIX)
    s0 = Lk - Lq + pid_m * BLOCK_M
    s1 = tl.minimum(s0 + BLOCK_M, Lk)
    acc = tl.zeros((BLOCK_M, 2 * HALF), dtype=tl.float32)
    # Finite start: a row that sees nothing keeps alpha = 1 and p = 0 instead of NaN.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q1, q2, qf1, qf2, qp, q_slot, q_lo, q_hi, KN, KF, V, KPOS, KVALID, BOUNDS, skf_l, sv_l,
        0, tl.minimum(prefix, s1), n_global, window, scaling, softcap, HALF, BLOCK_P, True, CAPPED, SOFTCAP, DOT_PREC,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_blocks(
        acc, m_i, l_i, q1, q2, qf1, qf2, qp, q_slot, q_lo, q_hi, KN, KF, V, KPOS, KVALID, BOUNDS, skf_l, sv_l,
        tl.maximum(prefix, s0 - window + 1), s1, n_global, window, scaling, softcap, HALF, BLOCK_N, False, CAPPED,
        SOFTCAP, DOT_PREC,
    )  # fmt: skip
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    offs_d = tl.arange(0, 2 * HALF)
    o_rows = OUT + ((b * Lq + offs_m) * Hq + h) * (2 * HALF)
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=m_ok[:, None])
    if LSE is not None:
        lse = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


# -- backward --------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(OUT, DO, DELTA, sdo_b, sdo_l, sdo_h, Hq, Lq, D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs_m < Lq
    offs_d = tl.arange(0, D)
    o = tl.load(OUT + ((b * Lq + offs_m[:, None]) * Hq + h) * D + offs_d[None, :], mask=ok[:, None])
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None].to(tl.int64) * sdo_l + offs_d[None, :], mask=ok[:, None])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=ok)


@triton.jit
def _bwd_q_blocks(
    dq1, dq2, q1, q2, qf1, qf2, do, lse, delta, qp, q_slot, q_lo, q_hi, TURNS, far_pos, far_ratio,
    KN, KF, V, KPOS, KVALID, BOUNDS, skf_l, sv_l, lo, hi, n_global, window, scaling, softcap,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, FAR: tl.constexpr, CAPPED: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dq over key slots [lo, hi), tiled as in _fwd_blocks (aligned window tiles, whole-tile skip)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, 2 * HALF)
    first = lo
    if not FAR:
        lo = lo // BLOCK_N * BLOCK_N
        next_min = tl.load(BOUNDS + (lo // BLOCK_N) * 2, mask=lo < hi, other=0)
        next_max = tl.load(BOUNDS + (lo // BLOCK_N) * 2 + 1, mask=lo < hi, other=0)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < hi
        if FAR:
            kp = tl.load(KPOS + offs_n, mask=n_ok, other=0).to(tl.int32)
            valid = (tl.load(KVALID + offs_n, mask=n_ok, other=0) != 0) & n_ok
        else:
            k_min = next_min
            k_max = next_max
            more = start + BLOCK_N < hi
            next_min = tl.load(BOUNDS + (start // BLOCK_N + 1) * 2, mask=more, other=0)
            next_max = tl.load(BOUNDS + (start // BLOCK_N + 1) * 2 + 1, mask=more, other=0)
        k_rows = KN + offs_n[:, None] * (2 * HALF) + offs_h[None, :]
        k1 = tl.load(k_rows, mask=n_ok[:, None], other=0.0)
        k2 = tl.load(k_rows + HALF, mask=n_ok[:, None], other=0.0)
        v_rows = V + start * sv_l + offs_n0[:, None] * sv_l + offs_d[None, :]
        v = tl.load(v_rows, mask=n_ok[:, None], other=0.0)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        if FAR:
            d = qp[:, None] - kp[None, :]
            if CAPPED:
                f_rows = KF + start * skf_l + offs_n0[:, None] * skf_l + offs_h[None, :]
                f1 = tl.load(f_rows, mask=n_ok[:, None], other=0.0)
                f2 = tl.load(f_rows + HALF, mask=n_ok[:, None], other=0.0)
            else:
                f1 = k1
                f2 = k2
            sf = tl.dot(qf1, tl.trans(f1), input_precision=DOT_PREC)
            sf = tl.dot(qf2, tl.trans(f2), sf, input_precision=DOT_PREC)
            s = tl.where(d < window, s, sf)
        if SOFTCAP:
            t = tanh(s * (scaling / softcap))
            z = t * (softcap * LOG2E)
        else:
            z = s * (scaling * LOG2E)
        if FAR:
            vis = (valid[None, :] & (offs_n[None, :] <= q_slot[:, None])) & (d >= 0)
            vis = vis & ((d < window) | (kp[None, :] < n_global))
            p = tl.where(vis, tl.exp2(z - lse[:, None]), 0.0)
        else:
            whole = (start >= first) & (start + BLOCK_N <= hi)
            if whole & (q_lo - k_max >= 0) & (q_hi - k_min < window):
                p = tl.exp2(z - lse[:, None])
            else:
                kp = tl.load(KPOS + offs_n, mask=n_ok, other=0).to(tl.int32)
                valid = tl.load(KVALID + offs_n, mask=n_ok, other=0) != 0
                d = qp[:, None] - kp[None, :]
                vis = (valid & n_ok & (offs_n >= first))[None, :] & (d >= 0) & (d < window)
                p = tl.where(vis, tl.exp2(z - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        if FAR:
            near = d < window
            dsn = tl.where(near, ds, 0.0).to(k1.dtype)
            dsf = tl.where(near, 0.0, ds).to(k1.dtype)
            dq1 = tl.dot(dsn, k1, dq1, input_precision=DOT_PREC)
            dq2 = tl.dot(dsn, k2, dq2, input_precision=DOT_PREC)
            # Far gradients move into the near frame by one rotation per row, R(q_pos - far_pos),
            # so the kernel keeps a single accumulator.
            g1 = tl.dot(dsf, f1, input_precision=DOT_PREC)
            g2 = tl.dot(dsf, f2, input_precision=DOT_PREC)
            if CAPPED:
                fpos = qp * 0 + far_pos
            else:
                fpos = tl.minimum(qp, far_pos)
            cos, sin = cos_sin(qp - fpos, TURNS, HALF)
            g1, g2 = rotate(g1, g2, cos, sin)
            dq1 += g1 * far_ratio
            dq2 += g2 * far_ratio
        else:
            ds = ds.to(k1.dtype)
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
            dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit
def _lambda_bwd_q(
    QN, QF, KN, KF, V, DO, LSE, DELTA, DQ, QPOS, KPOS, KVALID, BOUNDS, TURNS,
    skf_b, skf_h, skf_l, sv_b, sv_h, sv_l, sdo_b, sdo_l, sdo_h, sqp_b, skp_b, skv_b,
    Hq, Lq, Lk, prefix, group, n_global, window, far_pos, far_ratio, rot_scale, scaling, softcap,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAPPED: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, 2 * HALF)
    qp = tl.load(QPOS + b * sqp_b + offs_m, mask=m_ok, other=0).to(tl.int32)
    q_rows = ((b * Hq + h) * Lq + offs_m)[:, None] * (2 * HALF) + offs_h[None, :]
    q1 = tl.load(QN + q_rows, mask=m_ok[:, None], other=0.0)
    q2 = tl.load(QN + q_rows + HALF, mask=m_ok[:, None], other=0.0)
    qf1 = tl.load(QF + q_rows, mask=m_ok[:, None], other=0.0)
    qf2 = tl.load(QF + q_rows + HALF, mask=m_ok[:, None], other=0.0)
    do_rows = DO + b * sdo_b + h * sdo_h + offs_m.to(tl.int64) * sdo_l
    do = tl.load(do_rows[:, None] + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
    q_lo = tl.min(tl.where(m_ok, qp, 1 << 30), 0)
    q_hi = tl.max(tl.where(m_ok, qp, -(1 << 30)), 0)
    q_slot = Lk - Lq + offs_m

    KN = KN + (b * (Hq // group) + hk) * Lk * (2 * HALF)
    KF = KF + b * skf_b + hk * skf_h
    V = V + b * sv_b + hk * sv_h
    KPOS = KPOS + b * skp_b
    KVALID = KVALID + b * skv_b
    BOUNDS = BOUNDS + b * tl.cdiv(Lk, BLOCK_N) * 2
    s0 = Lk - Lq + pid_m * BLOCK_M
    s1 = tl.minimum(s0 + BLOCK_M, Lk)
    dq1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    dq2 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    dq1, dq2 = _bwd_q_blocks(
        dq1, dq2, q1, q2, qf1, qf2, do, lse, delta, qp, q_slot, q_lo, q_hi, TURNS, far_pos, far_ratio,
        KN, KF, V, KPOS, KVALID, BOUNDS, skf_l, sv_l, 0, tl.minimum(prefix, s1), n_global, window, scaling, softcap,
        HALF, BLOCK_N, True, CAPPED, SOFTCAP, DOT_PREC,
    )  # fmt: skip
    dq1, dq2 = _bwd_q_blocks(
        dq1, dq2, q1, q2, qf1, qf2, do, lse, delta, qp, q_slot, q_lo, q_hi, TURNS, far_pos, far_ratio,
        KN, KF, V, KPOS, KVALID, BOUNDS, skf_l, sv_l, tl.maximum(prefix, s0 - window + 1), s1, n_global, window,
        scaling, softcap, HALF, BLOCK_N, False, CAPPED, SOFTCAP, DOT_PREC,
    )  # fmt: skip
    cos, sin = cos_sin(qp, TURNS, HALF)
    dq1, dq2 = rotate(dq1, dq2, cos, -sin)
    factor = rot_scale * scaling
    dq_rows = ((b * Lq + offs_m) * Hq + h)[:, None] * (2 * HALF) + offs_h[None, :]
    tl.store(DQ + dq_rows, (dq1 * factor).to(DQ.dtype.element_ty), mask=m_ok[:, None])
    tl.store(DQ + dq_rows + HALF, (dq2 * factor).to(DQ.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _bwd_kv_blocks(
    dk1, dk2, dkf1, dkf2, dv, k1, k2, f1, f2, v, kp, kp_slot, valid, k_min, k_max,
    QN, QF, DO, LSE, DELTA, QPOS, QBOUNDS, sdo_l, lo, hi, off, n_global, window, scaling, softcap,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, FAR: tl.constexpr, CAPPED: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key tile over queries [lo, hi). Without FAR, queries go in BLOCK_M-aligned
    tiles whose precomputed position bounds (QBOUNDS) let a tile that sees every key skip the mask."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, 2 * HALF)
    first = lo
    if not FAR:
        lo = lo // BLOCK_M * BLOCK_M
        next_min = tl.load(QBOUNDS + (lo // BLOCK_M) * 2, mask=lo < hi, other=0)
        next_max = tl.load(QBOUNDS + (lo // BLOCK_M) * 2 + 1, mask=lo < hi, other=0)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + offs_m0
        m_ok = offs_m < hi
        if FAR:
            qp = tl.load(QPOS + offs_m, mask=m_ok, other=0).to(tl.int32)
        else:
            q_min = next_min
            q_max = next_max
            more = start + BLOCK_M < hi
            next_min = tl.load(QBOUNDS + (start // BLOCK_M + 1) * 2, mask=more, other=0)
            next_max = tl.load(QBOUNDS + (start // BLOCK_M + 1) * 2 + 1, mask=more, other=0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        q_rows = offs_m[:, None] * (2 * HALF) + offs_h[None, :]
        q1 = tl.load(QN + q_rows, mask=m_ok[:, None], other=0.0)
        q2 = tl.load(QN + q_rows + HALF, mask=m_ok[:, None], other=0.0)
        do_rows = DO + start * sdo_l + offs_m0[:, None] * sdo_l + offs_d[None, :]
        do = tl.load(do_rows, mask=m_ok[:, None], other=0.0)
        st = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PREC)
        if FAR:
            d = qp[None, :] - kp[:, None]
            qf1 = tl.load(QF + q_rows, mask=m_ok[:, None], other=0.0)
            qf2 = tl.load(QF + q_rows + HALF, mask=m_ok[:, None], other=0.0)
            sft = tl.dot(f1, tl.trans(qf1), input_precision=DOT_PREC)
            sft = tl.dot(f2, tl.trans(qf2), sft, input_precision=DOT_PREC)
            st = tl.where(d < window, st, sft)
        if SOFTCAP:
            t = tanh(st * (scaling / softcap))
            z = t * (softcap * LOG2E)
        else:
            z = st * (scaling * LOG2E)
        # Rows past hi have lse = inf, hence p = 0, on both paths.
        if FAR:
            vis = (valid[:, None] & (kp_slot[:, None] <= offs_m[None, :] + off)) & (d >= 0)
            vis = vis & ((d < window) | (kp[:, None] < n_global))
            pt = tl.where(vis, tl.exp2(z - lse[None, :]), 0.0)
        else:
            whole = (start >= first) & (start + BLOCK_M <= hi)
            if whole & (q_min - k_max >= 0) & (q_max - k_min < window):
                pt = tl.exp2(z - lse[None, :])
            else:
                qp = tl.load(QPOS + offs_m, mask=m_ok, other=0).to(tl.int32)
                d = qp[None, :] - kp[:, None]
                vis = valid[:, None] & (offs_m >= first)[None, :] & (d >= 0) & (d < window)
                pt = tl.where(vis, tl.exp2(z - lse[None, :]), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - t * t)
        if FAR:
            near = d < window
            dsn = tl.where(near, dst, 0.0).to(q1.dtype)
            dsf = tl.where(near, 0.0, dst).to(q1.dtype)
            dk1 = tl.dot(dsn, q1, dk1, input_precision=DOT_PREC)
            dk2 = tl.dot(dsn, q2, dk2, input_precision=DOT_PREC)
            if CAPPED:
                dkf1 = tl.dot(dsf, qf1, dkf1, input_precision=DOT_PREC)
                dkf2 = tl.dot(dsf, qf2, dkf2, input_precision=DOT_PREC)
            else:
                dk1 = tl.dot(dsf, qf1, dk1, input_precision=DOT_PREC)
                dk2 = tl.dot(dsf, qf2, dk2, input_precision=DOT_PREC)
        else:
            dst = dst.to(q1.dtype)
            dk1 = tl.dot(dst, q1, dk1, input_precision=DOT_PREC)
            dk2 = tl.dot(dst, q2, dk2, input_precision=DOT_PREC)
    return dk1, dk2, dkf1, dkf2, dv


@triton.jit
def _lambda_bwd_kv(
    QN, QF, KN, KF, V, DO, LSE, DELTA, DK, DV, QPOS, KPOS, KVALID, QBOUNDS, TURNS,
    skf_b, skf_h, skf_l, sv_b, sv_h, sv_l, sdo_b, sdo_l, sdo_h, sqp_b, skp_b, skv_b,
    Hq, Lq, Lk, rows, prefix, chunk, group, n_global, window, rot_scale, scaling, softcap,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREFIX: tl.constexpr, CAPPED: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key block. PREFIX: a block of slots < prefix, for the query chunk
    program_id(1) (prefix keys are seen by every later query, so their work is split into chunks
    and summed by the launcher); otherwise a window block, whose slots < prefix are left out."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    Hkv = Hq // group
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    t0 = pid_n * BLOCK_N
    offs_n = t0 + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, 2 * HALF)
    if PREFIX:
        n_ok = offs_n < prefix
    else:
        n_ok = (offs_n < Lk) & (offs_n >= prefix)
    kp = tl.load(KPOS + b * skp_b + offs_n, mask=n_ok, other=0).to(tl.int32)
    valid = (tl.load(KVALID + b * skv_b + offs_n, mask=n_ok, other=0) != 0) & n_ok
    k_rows = ((b * Hkv + hk) * Lk + offs_n)[:, None] * (2 * HALF) + offs_h[None, :]
    k1 = tl.load(KN + k_rows, mask=n_ok[:, None], other=0.0)
    k2 = tl.load(KN + k_rows + HALF, mask=n_ok[:, None], other=0.0)
    if CAPPED:
        f_rows = (b * skf_b + hk * skf_h + offs_n.to(tl.int64) * skf_l)[:, None] + offs_h[None, :]
        f1 = tl.load(KF + f_rows, mask=n_ok[:, None], other=0.0)
        f2 = tl.load(KF + f_rows + HALF, mask=n_ok[:, None], other=0.0)
    else:
        f1 = k1
        f2 = k2
    v_rows = (b * sv_b + hk * sv_h + offs_n.to(tl.int64) * sv_l)[:, None] + offs_d[None, :]
    v = tl.load(V + v_rows, mask=n_ok[:, None], other=0.0)
    k_min = tl.min(tl.where(valid, kp, -(1 << 30)), 0)
    k_max = tl.max(tl.where(valid, kp, 1 << 30), 0)

    off = Lk - Lq
    if PREFIX:
        lo = pid_c * chunk
        hi = tl.minimum(Lq, pid_c * chunk + chunk)
    else:
        lo = tl.maximum(0, t0 - off)
        hi = tl.minimum(Lq, t0 + BLOCK_N + window - 1 - off)
        hi = tl.where(t0 + BLOCK_N <= prefix, lo, hi)
    dk1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    dk2 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    dkf1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    dkf2 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, 2 * HALF), dtype=tl.float32)
    for g in range(group):
        h = hk * group + g
        q_row = (b * Hq + h) * Lq  # of query head h's first row in qn, qf, lse and delta
        dk1, dk2, dkf1, dkf2, dv = _bwd_kv_blocks(
            dk1, dk2, dkf1, dkf2, dv, k1, k2, f1, f2, v, kp, offs_n, valid, k_min, k_max,
            QN + q_row * (2 * HALF), QF + q_row * (2 * HALF), DO + b * sdo_b + h * sdo_h, LSE + q_row, DELTA + q_row,
            QPOS + b * sqp_b, QBOUNDS + b * tl.cdiv(Lq, BLOCK_M) * 2, sdo_l, lo, hi, off, n_global, window, scaling,
            softcap, HALF, BLOCK_M, PREFIX, CAPPED, SOFTCAP, DOT_PREC,
        )  # fmt: skip
    cos, sin = cos_sin(kp, TURNS, HALF)
    dk1, dk2 = rotate(dk1, dk2, cos, -sin)
    if PREFIX and CAPPED:
        dk1 += dkf1
        dk2 += dkf2
    factor = rot_scale * scaling
    # dk/dv are (B, Hkv, rows, D); for the prefix, one such partial per query chunk (chunks, B, Hkv, rows, D).
    out_rows = ((pid_c * tl.num_programs(2) + pid_bh).to(tl.int64) * rows + offs_n)[:, None] * (2 * HALF)
    rows_ok = (offs_n < rows)[:, None]
    tl.store(DK + out_rows + offs_h[None, :], (dk1 * factor).to(DK.dtype.element_ty), mask=rows_ok)
    tl.store(DK + out_rows + HALF + offs_h[None, :], (dk2 * factor).to(DK.dtype.element_ty), mask=rows_ok)
    tl.store(DV + out_rows + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=rows_ok)


# -- launchers -------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, head dim and float32-or-not; measured on an
# H100 with the attention benchmark's `--sweep`. Fixed rather than autotuned: a new prompt
# length never stalls on tuning, and each variant compiles once.
GPU_CONFIGS: dict[tuple[str, int, bool], tuple[int, int, int, int]] = {
    ("fwd", 64, False): (128, 64, 4, 3),
    ("fwd", 128, False): (128, 64, 8, 3),
    ("bwd_q", 64, False): (64, 64, 4, 2),
    ("bwd_q", 128, False): (128, 64, 8, 2),
    ("bwd_kv", 64, False): (64, 64, 4, 2),
    ("bwd_kv", 128, False): (64, 128, 8, 2),
    ("bwd_kv_prefix", 64, False): (64, 64, 4, 2),
    ("bwd_kv_prefix", 128, False): (32, 128, 8, 2),
}
FP32_CONFIG = (32, 32, 4, 2)  # float32 is for tests: keep shared memory small


def kernel_config(name: str, dim: int, dtype: torch.dtype) -> dict:
    if interpreting():
        block_m, block_n, warps, stages = 32, 32, 4, 1
    elif dtype == torch.float32:
        block_m, block_n, warps, stages = FP32_CONFIG
    else:
        block_m, block_n, warps, stages = GPU_CONFIGS[(name, dim, False)]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def leading_block(block_n: int, slots: int) -> int:
    """Keys per tile for a short leading run of `slots` key slots scored under the whole Λ rule (both distances,
    keys rotated in the kernel): the prefill's prefix of global keys, the decode kernel's un-rotated sinks. About
    their count, so a run longer than expected (padding before the globals) takes more tiles. Scoring a full tile
    so holds more values live than the rest of either kernel: at 64 keys ptxas spilled 200 (prefill) and 464
    (decode) bytes of stack per thread (sm_90, Triton 3.9, bf16, head dim 128), at 16 none."""
    return min(block_n, max(16, triton.next_power_of_2(slots)))


def prefill_forward(q, k, v, qpos, kpos, kvalid, spec, rotary, scaling, softcap, need_lse, far_slots=None):
    """The forward kernel: output (B, Lq, Hq, D), its base-2 log-sum-exp (B, Hq, Lq) if need_lse, and P.

    Positions and validity need a unit stride on their last dim, as q/k/v do (see the module docstring).
    `far_slots` sets P, the leading slots scored by the prefix loop (both distances, every position),
    where the caller knows that every later slot within the window is visible at its true distance;
    by default P spans the slots that hold global keys.
    """
    batch, q_heads, q_len, dim = q.shape
    capped, far_pos = far_rule(spec)
    turns = frequency_turns(rotary.inv_freq, q.device)
    kn, _ = rope(k, kpos, turns, rotary.scale)
    if far_slots is None:
        prefix = prefix_length(kpos, kvalid, spec.n_global)
    else:
        prefix = torch.full((), far_slots, dtype=torch.int32, device=q.device)
    out = torch.empty(batch, q_len, q_heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device) if need_lse else None
    config = kernel_config("fwd", dim, q.dtype)
    bounds = block_bounds(kpos, kvalid, config["BLOCK_N"])
    block_p = leading_block(config["BLOCK_N"], spec.n_global if far_slots is None else far_slots)
    _lambda_fwd[(triton.cdiv(q_len, config["BLOCK_M"]), batch * q_heads)](
        q, kn, k, v, out, lse, qpos, kpos, kvalid.view(torch.uint8), bounds, prefix, turns,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], qpos.stride(0), kpos.stride(0), kvalid.stride(0),
        q_heads, q_len, k.shape[2], q_heads // k.shape[1], spec.n_global, spec.window, far_pos, rotary.scale, scaling,
        softcap or 0.0, HALF=dim // 2, BLOCK_P=block_p, CAPPED=capped, SOFTCAP=softcap is not None,
        DOT_PREC=dot_precision(q.dtype), **config,
    )  # fmt: skip
    return out, lse, prefix


def _backward(do, q, k, v, out, lse, qpos, kpos, kvalid, prefix, spec, rotary, scaling, softcap):
    batch, q_heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    (do,) = unit_last(do)
    capped, far_pos = far_rule(spec)
    prefix = int(prefix)  # one host sync: the prefix work below is sized by it
    turns = frequency_turns(rotary.inv_freq, q.device)
    rot_scale = rotary.scale
    qn, qf = rope(q, qpos, turns, rot_scale, far=(far_pos, rot_scale * rot_scale if capped else rot_scale, capped))
    kn, _ = rope(k, kpos, turns, rot_scale)
    valid = kvalid.view(torch.uint8)
    flags = dict(HALF=dim // 2, CAPPED=capped, SOFTCAP=softcap is not None, DOT_PREC=dot_precision(q.dtype))
    softcap = softcap or 0.0
    # The tensors read where the caller keeps them: k (the far keys of the capped rule), v, do, positions.
    strides = (*k.stride()[:3], *v.stride()[:3], *do.stride()[:3], qpos.stride(0), kpos.stride(0), valid.stride(0))

    delta = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    block = 32 if interpreting() else 64
    _bwd_preprocess[(triton.cdiv(q_len, block), batch * q_heads)](
        out, do, delta, *do.stride()[:3], q_heads, q_len, D=dim, BLOCK_M=block
    )

    # dq in out's memory layout: the (B, Lq, Hq, D) that transformers' q comes from, as a (B, Hq, Lq, D) view.
    dq = torch.empty_like(out).transpose(1, 2)
    config = kernel_config("bwd_q", dim, q.dtype)
    bounds = block_bounds(kpos, kvalid, config["BLOCK_N"])
    _lambda_bwd_q[(triton.cdiv(q_len, config["BLOCK_M"]), batch * q_heads)](
        qn, qf, kn, k, v, do, lse, delta, dq, qpos, kpos, valid, bounds, turns, *strides,
        q_heads, q_len, k_len, prefix, group, spec.n_global, spec.window, far_pos, rot_scale if capped else 1.0,
        rot_scale, scaling, softcap, **flags, **config,
    )  # fmt: skip

    def dkdv(dk, dv, rows, chunk, grid, config, is_prefix):
        bounds = block_bounds(qpos, None, config["BLOCK_M"])
        _lambda_bwd_kv[grid](
            qn, qf, kn, k, v, do, lse, delta, dk, dv, qpos, kpos, valid, bounds, turns, *strides,
            q_heads, q_len, k_len, rows, prefix, chunk, group, spec.n_global, spec.window, rot_scale, scaling, softcap,
            PREFIX=is_prefix, **flags, **config,
        )  # fmt: skip

    dk = torch.empty(batch, kv_heads, k_len, dim, dtype=k.dtype, device=k.device)
    dv = torch.empty(batch, kv_heads, k_len, dim, dtype=v.dtype, device=v.device)
    config = kernel_config("bwd_kv", dim, q.dtype)
    dkdv(dk, dv, k_len, q_len, (triton.cdiv(k_len, config["BLOCK_N"]), 1, batch * kv_heads), config, False)
    if prefix > 0:
        # Every later query sees the prefix keys: split those queries into window-sized chunks
        # so that these programs take about as long as the window ones, then sum the chunks.
        chunk = max(256, triton.cdiv(spec.window, 256) * 256)
        chunks = triton.cdiv(q_len, chunk)
        dkp = torch.empty(chunks, batch, kv_heads, prefix, dim, dtype=torch.float32, device=k.device)
        dvp = torch.empty_like(dkp)
        config = kernel_config("bwd_kv_prefix", dim, q.dtype)
        dkdv(dkp, dvp, prefix, chunk, (triton.cdiv(prefix, config["BLOCK_N"]), chunks, batch * kv_heads), config, True)
        dk[:, :, :prefix] = dkp.sum(0)
        dv[:, :, :prefix] = dvp.sum(0)
    return dq, dk, dv


class LambdaAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qpos, kpos, kvalid, spec, rotary, scaling, softcap):
        out, lse, prefix = prefill_forward(q, k, v, qpos, kpos, kvalid, spec, rotary, scaling, softcap, need_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, qpos, kpos, kvalid, prefix)
        ctx.args = (spec, rotary, scaling, softcap)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, qpos, kpos, kvalid, prefix = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, qpos, kpos, kvalid, prefix, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def lambda_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    spec: LambdaSpec,
    rotary: Rotary,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Λ attention over any number of queries, differentiable; returns (B, Lq, Hq, D)."""
    args = (query, key, value, *unit_last(query_positions, key_positions, key_valid), spec, rotary, scaling, softcap)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return LambdaAttentionFunction.apply(*args)
    out, _, _ = prefill_forward(*args, need_lse=False)
    return out
