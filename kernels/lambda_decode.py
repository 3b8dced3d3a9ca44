"""Λ attention for decoding: a few queries over the bounded cache, split-KV (flash-decoding).

Spec: `lambda_reference.lambda_attention_reference` beside it.

The cache holds at most n_global + window (+ the new tokens) slots, so every slot is a candidate
and the mask follows positions and key_valid alone. All query heads of one KV head (and all new
tokens) are the rows of one program, so each key is read from memory, and rotated, once; the key
range is split across programs so that small batches still fill the GPU, then the last of them (or a
second kernel) merges the partial softmaxes.

Un-rotated keys are rotated in the kernel, at their positions (near pairs) and at the far rule's.
That is most of the work per key (angles, cos/sin, the rotation, a second pair of dot products: ~1,170
instructions per 64-key tile and warp in sm_90 SASS from Triton 3.9, against ~480 without), so a cache that stores its
window rotated (RingLambdaCache: `rotated_from`) gets those tiles read as plain flash-decoding tiles.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .lambda_prefill import far_rule, leading_block
from .rope import FAST_TRIG, cos_sin, frequency_turns, rotate, rotated_rows
from .specs import LambdaSpec, Rotary
from .utils import LOG2E, dot_precision, interpreting, sm_count, tanh

# Rows = query heads per KV head x new tokens; more than this goes to the prefill kernel.
DECODE_MAX_ROWS = 64


class DecodeConfig(NamedTuple):
    """The decode kernel's performance choices (none changes the result beyond rounding)."""

    block_n: int  # keys per tile
    warps: int
    stages: int
    per_sm: int  # programs resident per SM: the heuristic launches at most this many per SM (one wave)
    min_tiles: int = 4  # no split shorter than this many key tiles
    splits: int = 0  # > 0: exactly this many splits (capped by the key tiles), overriding the heuristic
    fused: bool = True  # the last split program merges the splits (one launch), else a second kernel
    fixed_angles: bool = True  # key angles reduced in 64-bit fixed point (integer ops), else in float64
    merge: int = 0  # partials the merge loads at once (a power of 2); 0: up to MERGE_ELEMENTS floats' worth


# benchmarks/attention/decode_sweep.py on an H100 with Triton 3.6, ring layout: 128-key tiles x 4 warps x 2 stages
# were the fastest at both batches and both cache sizes swept. Two programs fit per SM, so 2 per SM fill the
# GPU once: at batch 8 that is 4 splits (a second partial wave costs more than it spreads). At batch 1,
# min_tiles=3 keeps few splits (merging partials costs more than it spreads):
# - 4 + 4,096 + 1 slots (2026-12-07): batch 1, 11 splits, 12.85 µs (64-key tiles, 13 splits: 15.94 µs);
#   batch 8, 4 splits, 55.46 µs (57.22 µs);
# - 10 + 8,192 slots (2026-12-07, issue 19's): batch 1, 22 splits, 20.5 µs (13 splits: 18.4; 64-key
#   tiles, 26 splits: 22.5); batch 8, 4 splits, 98.2 µs (101.9).
# A plain 4-tuple (BLOCK_N, warps, stages, programs per SM) is taken too.
DECODE_CONFIG = DecodeConfig(128, 4, 2, 2, min_tiles=3)
# The merge's default load: partial outputs of MERGE_ELEMENTS floats in all (64 registers per thread of 4 warps).
# decode_sweep.py on an H100, 2026-12-07, 8,202 slots, batch 1: against one partial per load (merge=1) this
# gains at 43 splits (22.0 vs 24.2 µs), not at 26 (22.5 vs 21.4 µs; the 64-key default then) or 15 (23.6 vs 22.8 µs).
MERGE_ELEMENTS = 8192
# Each (batch, KV head)'s count of finished split programs, per (device, stream); back at 0 after every call.
_ARRIVALS: dict[tuple[str, int], list[torch.Tensor]] = {}


@triton.jit
def _lambda_decode_split(
    Q,
    K,
    V,
    PART_O,
    PART_ML,
    OUT,
    LSE,
    ARRIVALS,
    QPOS,
    KPOS,
    KVALID,
    TURNS,
    sq_b,
    sq_h,
    sq_l,
    sk_b,
    sk_h,
    sk_l,
    sv_b,
    sv_h,
    sv_l,
    sqp_b,
    sqp_l,
    skp_b,
    skp_l,
    skv_b,
    skv_l,
    so_b,
    so_l,
    so_h,
    Hkv,
    Lq,
    Lk,
    group,
    split_len,
    n_global,
    window,
    rotated_from,
    far_pos,
    rot_scale,
    scaling,
    softcap,
    HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    MERGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CAPPED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MODE: tl.constexpr,
    FIXED_ANGLES: tl.constexpr,
    NEED_LSE: tl.constexpr,
):
    # MODE: 0 writes this split's partial softmax (a second kernel merges them); 1 (one split) writes
    # the output; 2 writes the partial, and the last split program of its (batch, KV head) merges them.
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < group * Lq
    qi = rows % Lq
    h = hk * group + rows // Lq
    qp = tl.load(QPOS + b * sqp_b + qi * sqp_l, mask=row_ok, other=0).to(tl.int32)
    q_rows = Q + b * sq_b + h * sq_h + qi.to(tl.int64) * sq_l
    if SOFTCAP:
        q_scale = 1.0
    else:
        q_scale = scaling * LOG2E
    q1, q2, qf1, qf2 = rotated_rows(q_rows, row_ok, qp, TURNS, far_pos, rot_scale, q_scale, HALF, CAPPED)

    K = K + b * sk_b + hk * sk_h
    V = V + b * sv_b + hk * sv_h
    KPOS = KPOS + b * skp_b
    KVALID = KVALID + b * skv_b
    acc = tl.zeros((BLOCK_M, 2 * HALF), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, Lk)
    # The slots before rotated_from (the sinks of a ring cache) are rotated here, under the whole Λ rule;
    # the rest arrive rotated and hold no global token: plain flash-decoding tiles, near pairs only.
    split_at = tl.maximum(lo, tl.minimum(hi, rotated_from))
    # fmt: off
    acc, m_i, l_i = _decode_tiles(acc, m_i, l_i, lo, split_at, K, V, KPOS, KVALID, sk_l, sv_l, skp_l, skv_l, TURNS,
                                  qp, q1, q2, qf1, qf2, n_global, window, rot_scale, scaling, softcap,
                                  HALF, BLOCK_S, CAPPED, SOFTCAP, DOT_PREC, FIXED_ANGLES, False)
    acc, m_i, l_i = _decode_tiles(acc, m_i, l_i, split_at, hi, K, V, KPOS, KVALID, sk_l, sv_l, skp_l, skv_l, TURNS,
                                  qp, q1, q2, qf1, qf2, n_global, window, rot_scale, scaling, softcap,
                                  HALF, BLOCK_N, CAPPED, SOFTCAP, DOT_PREC, FIXED_ANGLES, True)
    # fmt: on
    if MODE == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        _store_rows(OUT, out, b, hk, rows, so_b, so_l, so_h, Lq, group, 2 * HALF)
        if NEED_LSE:
            _store_lse(LSE, m_i, l_i, b, hk, rows, Hkv, Lq, group)
    else:
        splits = tl.num_programs(1)
        offs_d = tl.arange(0, 2 * HALF)
        part = pid_bh.to(tl.int64) * splits + split
        tl.store(PART_O + (part * BLOCK_M + rows)[:, None] * (2 * HALF) + offs_d[None, :], acc)
        tl.store(PART_ML + part * 2 * BLOCK_M + rows, m_i)
        tl.store(PART_ML + part * 2 * BLOCK_M + BLOCK_M + rows, l_i)
        if MODE == 2:
            # Every thread's partial is written before the count is released to the other programs.
            tl.debug_barrier()
            arrived = tl.atomic_add(ARRIVALS + pid_bh, 1, sem="acq_rel", scope="gpu")
            if arrived == splits - 1:
                out, m, total = _merge_splits(PART_O, PART_ML, pid_bh, splits, 2 * HALF, BLOCK_M, ROWS, MERGE)
                out_rows = tl.arange(0, ROWS)
                _store_rows(OUT, out, b, hk, out_rows, so_b, so_l, so_h, Lq, group, 2 * HALF)
                if NEED_LSE:
                    _store_lse(LSE, m, total, b, hk, out_rows, Hkv, Lq, group)
                tl.store(ARRIVALS + pid_bh, 0)  # ready for the next call (and every CUDA graph replay)


@triton.jit
def _decode_tiles(
    acc,
    m_i,
    l_i,
    lo,
    hi,
    K,
    V,
    KPOS,
    KVALID,
    sk_l,
    sv_l,
    skp_l,
    skv_l,
    TURNS,
    qp,
    q1,
    q2,
    qf1,
    qf2,
    n_global,
    window,
    rot_scale,
    scaling,
    softcap,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAPPED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FIXED_ANGLES: tl.constexpr,
    ROTATED: tl.constexpr,
):
    """The online softmax (acc, m_i, l_i) carried over key slots [lo, hi)."""
    if FIXED_ANGLES and not ROTATED:
        turns_fixed = _fixed_point(TURNS, HALF)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, 2 * HALF)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < hi
        kp = tl.load(KPOS + offs_n * skp_l, mask=n_ok, other=0).to(tl.int32)
        valid = (tl.load(KVALID + offs_n * skv_l, mask=n_ok, other=0) != 0) & n_ok
        k_rows = K + start * sk_l + offs_n0[:, None] * sk_l + offs_h[None, :]
        x1 = tl.load(k_rows, mask=n_ok[:, None], other=0.0)
        x2 = tl.load(k_rows + HALF, mask=n_ok[:, None], other=0.0)
        d = qp[:, None] - kp[None, :]
        if ROTATED:
            s = tl.dot(q1, tl.trans(x1), input_precision=DOT_PREC)
            s = tl.dot(q2, tl.trans(x2), s, input_precision=DOT_PREC)
            vis = valid[None, :] & (d >= 0) & (d < window)
        else:
            if FIXED_ANGLES:
                cos, sin = _cos_sin_fixed(kp, turns_fixed)
            else:
                cos, sin = cos_sin(kp, TURNS, HALF)
            k1, k2 = rotate(x1.to(tl.float32), x2.to(tl.float32), cos, sin)
            k1 = (k1 * rot_scale).to(x1.dtype)
            k2 = (k2 * rot_scale).to(x1.dtype)
            s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
            # The far dot product is cheap next to reading the keys: no branch on "tile holds sinks".
            if CAPPED:
                sf = tl.dot(qf1, tl.trans(x1), input_precision=DOT_PREC)
                sf = tl.dot(qf2, tl.trans(x2), sf, input_precision=DOT_PREC)
            else:
                sf = tl.dot(qf1, tl.trans(k1), input_precision=DOT_PREC)
                sf = tl.dot(qf2, tl.trans(k2), sf, input_precision=DOT_PREC)
            s = tl.where(d < window, s, sf)
            vis = valid[None, :] & (d >= 0) & ((d < window) | (kp[None, :] < n_global))
        if SOFTCAP:
            s = tanh(s * (scaling / softcap)) * (softcap * LOG2E)
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
def _fixed_point(TURNS, HALF: tl.constexpr):
    """The rotary frequencies (float64 turns per position) modulo one turn, times 2^64, as int64."""
    turns = tl.load(TURNS + tl.arange(0, HALF))
    return ((turns - tl.floor(turns + 0.5)) * 18446744073709551616.0).to(tl.int64)


@triton.jit
def _cos_sin_fixed(pos, turns_fixed):
    """`cos_sin` with the angle reduced by integer ops: position x fixed-point turns wraps modulo one turn
    (2^64), and the top 32 bits, signed, are the angle in [-1/2, 1/2) turn. Exact to 2^-32 turn (float64's
    reduction loses ~2^-53 x position turns), and no float64 rounding or conversion per key."""
    turn = ((pos.to(tl.int64)[:, None] * turns_fixed[None, :]) >> 32).to(tl.int32)
    angle = turn.to(tl.float32) * 1.4629180792671596e-09  # 2π / 2^32
    if FAST_TRIG:
        return libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
    else:
        return tl.cos(angle), tl.sin(angle)


@triton.jit
def _merge_splits(
    PART_O, PART_ML, pid_bh, splits, D: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, MERGE: tl.constexpr
):
    """The first ROWS output rows (ROWS, D), float32, of one (batch, KV head)'s partial softmaxes.

    MERGE partials per load: their loads do not wait on each other, so the merge waits on L2 once per
    MERGE splits, where a loop of one split per load waits once per split."""
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    acc = tl.zeros((ROWS, D), dtype=tl.float32)
    m = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for first in range(0, splits, MERGE):
        split = first + tl.arange(0, MERGE)
        split_ok = split < splits
        part = pid_bh.to(tl.int64) * splits + split
        ml = PART_ML + part[:, None] * 2 * BLOCK_M + rows[None, :]
        # .cg: other SMs wrote these; read them from L2, never from a stale L1 line.
        m_s = tl.load(ml, mask=split_ok[:, None], other=-1.0e30, cache_modifier=".cg")
        l_s = tl.load(ml + BLOCK_M, mask=split_ok[:, None], other=0.0, cache_modifier=".cg")
        o_rows = (part[:, None] * BLOCK_M + rows[None, :]) * D
        o_s = tl.load(
            PART_O + o_rows[:, :, None] + offs_d[None, None, :],
            mask=split_ok[:, None, None],
            other=0.0,
            cache_modifier=".cg",
        )
        m_new = tl.maximum(m, tl.max(m_s, 0))
        a = tl.exp2(m - m_new)
        c = tl.exp2(m_s - m_new[None, :])
        acc = acc * a[:, None] + tl.sum(o_s * c[:, :, None], 0)
        total = total * a + tl.sum(l_s * c, 0)
        m = m_new
    return acc / tl.where(total > 0, total, 1.0)[:, None], m, total


@triton.jit
def _store_rows(OUT, out, b, hk, rows, so_b, so_l, so_h, Lq, group, D: tl.constexpr):
    """Store rows (query head of KV head hk x new token) of `out` into OUT (B, Lq, Hq, D)."""
    qi = rows % Lq
    h = hk * group + rows // Lq
    o_rows = OUT + b * so_b + qi.to(tl.int64) * so_l + h * so_h
    offs_d = tl.arange(0, D)
    row_ok = rows < group * Lq
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _store_lse(LSE, m, total, b, hk, rows, Hkv, Lq, group):
    """Store the rows' base-2 log-sum-exp into LSE (B, Hq, Lq); +inf where no key is visible (as the prefill
    kernel's), so that exp2(score - lse) is 0 there."""
    qi = rows % Lq
    h = hk * group + rows // Lq
    lse = tl.where(total > 0, m + tl.log2(tl.where(total > 0, total, 1.0)), float("inf"))
    tl.store(LSE + (b * Hkv * group + h) * Lq + qi, lse, mask=rows < group * Lq)


@triton.jit
def _lambda_decode_combine(
    PART_O,
    PART_ML,
    OUT,
    LSE,
    so_b,
    so_l,
    so_h,
    Hkv,
    Lq,
    group,
    splits,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    MERGE: tl.constexpr,
    NEED_LSE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    rows = tl.arange(0, ROWS)
    out, m, total = _merge_splits(PART_O, PART_ML, pid_bh, splits, D, BLOCK_M, ROWS, MERGE)
    _store_rows(OUT, out, b, hk, rows, so_b, so_l, so_h, Lq, group, D)
    if NEED_LSE:
        _store_lse(LSE, m, total, b, hk, rows, Hkv, Lq, group)


def decode_plan(batch: int, kv_heads: int, k_len: int, device: torch.device, config=None) -> tuple[DecodeConfig, int]:
    """The config (`config`, else DECODE_CONFIG; a small one under the interpreter) and the split count
    a decode over k_len keys runs with."""
    if config is None:
        config = DecodeConfig(32, 4, 1, 1, splits=3) if interpreting() else DECODE_CONFIG
    config = DecodeConfig(*config)
    if config.merge < 0 or config.merge & (config.merge - 1):
        raise ValueError(
            f"DecodeConfig.merge={config.merge}: the merge loads a power of 2 of partials, or 0 (automatic)"
        )
    tiles = triton.cdiv(k_len, config.block_n)
    if config.splits > 0:
        splits = min(config.splits, tiles)
    else:
        # As many programs as run at once (per_sm on every SM): a second, partial wave would take as long as
        # the first. No split shorter than min_tiles tiles.
        sms = 4 if interpreting() else sm_count(device.index or 0)
        wanted = max(1, config.per_sm * sms // (batch * kv_heads))
        splits = max(1, min(wanted, triton.cdiv(tiles, config.min_tiles)))
    # Whole tiles per split; rounding up may leave fewer splits than asked for.
    return config, triton.cdiv(tiles, triton.cdiv(tiles, splits))


def _arrivals(device: torch.device, programs: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (batch, KV head), that the fused merge leaves zeroed.

    Kept per (device, stream): calls on one stream run one after another, so they never share a
    counter mid-call (CUDA graphs replay with the counters of the stream they were captured on; two
    graphs captured on one stream must not be replayed concurrently). Outgrown counters stay alive,
    as a captured graph may still point at them.
    """
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    kept = _ARRIVALS.setdefault((str(device), stream), [])
    if not kept or kept[-1].numel() < programs:
        kept.append(torch.zeros(max(4096, triton.next_power_of_2(programs)), dtype=torch.int32, device=device))
    return kept[-1]


def lambda_decode(
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
    rotated_from: int | None = None,
    config: DecodeConfig | None = None,
    need_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Λ attention of a few queries (heads per KV head x queries <= DECODE_MAX_ROWS), no autograd.

    Key slots from `rotated_from` on hold keys already rotated at their positions, none of them a
    global token (the reference's contract); `config` overrides DECODE_CONFIG (the sweep and the
    tests run each candidate through it). With `need_lse`, also the base-2 log-sum-exp (B, Hq, Lq)
    of the scaled scores, +inf where a query sees no key (the prefill kernel's convention).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    capped, far_pos = far_rule(spec)
    turns = frequency_turns(rotary.inv_freq, query.device)
    block_m = max(16, triton.next_power_of_2(group * q_len))
    # The rows that hold a query (tl.dot pads to 16), at least 4: the merge's tiles are no smaller.
    rows = min(block_m, max(4, triton.next_power_of_2(group * q_len)))
    config, splits = decode_plan(batch, kv_heads, k_len, query.device, config)
    merge = config.merge or max(1, MERGE_ELEMENTS // (rows * dim))
    merge = min(merge, triton.next_power_of_2(splits))
    block_s = config.block_n if rotated_from is None else leading_block(config.block_n, rotated_from)
    split_len = triton.cdiv(triton.cdiv(k_len, config.block_n), splits) * config.block_n
    mode = 1 if splits == 1 else 2 if config.fused else 0
    out = torch.empty(batch, q_len, q_heads, dim, dtype=query.dtype, device=query.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=query.device) if need_lse else out
    if mode == 1:
        part_o = part_ml = arrivals = out
    else:
        part_o = torch.empty(batch * kv_heads * splits * block_m, dim, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(batch * kv_heads * splits * 2 * block_m, dtype=torch.float32, device=query.device)
        arrivals = _arrivals(query.device, batch * kv_heads) if mode == 2 else part_ml
    valid = key_valid.view(torch.uint8)
    _lambda_decode_split[(batch * kv_heads, splits)](
        query,
        key,
        value,
        part_o,
        part_ml,
        out,
        lse,
        arrivals,
        query_positions,
        key_positions,
        valid,
        turns,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        query_positions.stride(0),
        query_positions.stride(1),
        key_positions.stride(0),
        key_positions.stride(1),
        valid.stride(0),
        valid.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        kv_heads,
        q_len,
        k_len,
        group,
        split_len,
        spec.n_global,
        spec.window,
        k_len if rotated_from is None else rotated_from,
        far_pos,
        rotary.scale,
        scaling,
        softcap or 0.0,
        HALF=dim // 2,
        BLOCK_M=block_m,
        ROWS=rows,
        MERGE=merge,
        BLOCK_N=config.block_n,
        BLOCK_S=block_s,
        CAPPED=capped,
        SOFTCAP=softcap is not None,
        DOT_PREC=dot_precision(query.dtype),
        MODE=mode,
        FIXED_ANGLES=config.fixed_angles,
        NEED_LSE=need_lse,
        num_warps=config.warps,
        num_stages=config.stages,
    )
    if mode == 0:
        _lambda_decode_combine[(batch * kv_heads,)](
            part_o,
            part_ml,
            out,
            lse,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            kv_heads,
            q_len,
            group,
            splits,
            D=dim,
            BLOCK_M=block_m,
            ROWS=rows,
            MERGE=merge,
            NEED_LSE=need_lse,
            num_warps=4,
        )
    return (out, lse) if need_lse else out
