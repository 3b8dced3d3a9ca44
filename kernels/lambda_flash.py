"""Λ attention on flash-attention: the window in one flash-attention call, the global keys merged by log-sum-exp.

Every visible (i, j) pair belongs to exactly one of

- the *window part*: 0 <= i - j < window, rotated at the true distance. With q and k rotated at their
  positions this is flash-attention's causal sliding window (window_size = (window - 1, 0)), which
  returns its log-sum-exp;
- the *global part*: j < n_global and i - j >= window, rotated at the method's far positions: at most
  n_global keys per query (one tensor-core tile for all of them), scored by the Triton kernel that rotates
  q for flash-attention (`_score_fwd`, which reads q once for both), then merged into flash-attention's
  output in place (`_merge_fwd`, which reads only that output and the scores):

      out = (e^(lse_w - m) o_w + sum_g e^(s_g - m) v_g) / Z,      lse = m + log Z

The backward hands flash-attention's backward the *merged* out and lse: its P = e^(s - lse) is then each
window pair's share of the full softmax, and its D = rowsum(dout * out) the full softmax's, so it returns
exactly the window pairs' part of dq, dk, dv. The backward merge (`_merge_bwd`) adds the global keys' part
and rotates flash-attention's dq back, writing the un-rotated query's whole gradient.

Flash-attention masks by slot, not by position: its keys are the run of valid slots at consecutive
positions that ends with the queries (`layout` finds it, and says why a call has none: a left-padded
batch, say); keys must be in stream order (not a ring buffer). A bounded cache's sink slots lie before
that run: the global part scores them too, at the true distance where they are inside a window. The
engine takes `WindowAttention`, the two calls it makes to flash-attention, as an argument:
`REFERENCE_WINDOW` is a plain PyTorch stand-in, so the merge is tested against `lambda_reference` on any
device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .lambda_prefill import far_rule
from .rope import cos_sin, frequency_turns, rope, rotate
from .specs import LambdaSpec, Rotary
from .utils import dot_precision, interpreting, sm_count, unit_last


class WindowAttention(NamedTuple):
    """Causal sliding-window attention with the queries as the last Lq keys, keys i - j < window; q (B, Lq, Hq, D)
    and k/v (B, Lk, Hkv, D) rotated, lse (B, Hq, Lq) float32, natural log.

    forward(q, k, v, window, scale) -> (out, lse);
    backward(q, k, v, out, dout, lse, window, scale) -> (dq, dk, dv), taking the out and lse to use for the
    softmax's probabilities and their row sums (the merged ones: see the module's docstring).
    """

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _window_forward_flash(q, k, v, window: int, scale: float):
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(
        q, k, v, softmax_scale=scale, causal=True, window_size_left=window - 1, window_size_right=0, return_lse=True
    )
    return out, lse


def _window_backward_flash(q, k, v, out, dout, lse, window: int, scale: float):
    # flash-attention's public autograd function differentiates its own softmax; its backward, called
    # directly, takes any (out, lse), which is how ring attention merges blocks too.
    from flash_attn.cute.interface import _flash_attn_bwd

    return _flash_attn_bwd(
        q, k, v, out, dout, lse, scale, causal=True, window_size_left=window - 1, window_size_right=0
    )[:3]


def _window_scores(q, k, window: int, scale: float):
    """(B, Hq, Lq, Lk) float32 scores, -inf outside the window, with k repeated over each group."""
    q_len, k_len = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    qf = q.transpose(1, 2).float()
    kf = k.transpose(1, 2).float().repeat_interleave(group, 1)
    i = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=q.device)[None, :]
    return (qf @ kf.transpose(-1, -2) * scale).masked_fill((j > i) | (i - j >= window), float("-inf"))


def _window_forward_reference(q, k, v, window: int, scale: float):
    group = q.shape[2] // k.shape[2]
    scores = _window_scores(q, k, window, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v.transpose(1, 2).float().repeat_interleave(group, 1)
    return out.transpose(1, 2).to(q.dtype), lse


def _window_backward_reference(q, k, v, out, dout, lse, window: int, scale: float):
    """The softmax's gradient written out: dS = P (dP - rowsum(dout * out)), with P from the given lse."""
    batch, k_len, kv_heads, dim = k.shape
    group = q.shape[2] // kv_heads
    p = torch.exp(_window_scores(q, k, window, scale) - lse[..., None])
    qf, do, o = (t.transpose(1, 2).float() for t in (q, dout, out))
    kf, vf = (t.transpose(1, 2).float().repeat_interleave(group, 1) for t in (k, v))
    ds = p * (do @ vf.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk, dv = (
        x.view(batch, kv_heads, group, k_len, dim).sum(2)
        for x in (ds.transpose(-1, -2) @ qf * scale, p.transpose(-1, -2) @ do)
    )
    return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


FLASH_WINDOW = WindowAttention(_window_forward_flash, _window_backward_flash)  # flash-attn-4: Hopper, Blackwell
REFERENCE_WINDOW = WindowAttention(_window_forward_reference, _window_backward_reference)  # O(Lq x Lk) memory


NONE = -(2**30)  # a position before every window


class Layout(NamedTuple):
    """What the engine needs to know on the host about a call's keys, read in one sync (`layout`)."""

    problem: str | None  # why flash-attention cannot take this call's keys; None: it can
    tail: int  # flash-attention's keys: slots [tail, Lk), valid, at consecutive positions, the queries last
    prefix: int  # 1 + the last slot holding a valid global token (0: none)
    first_global: int  # the smallest position of a valid global token
    last_outside: int  # the largest position of a valid global token before `tail` (NONE: there is none)
    first_query: int
    last_query: int
    query_positions: torch.Tensor  # int32, contiguous: what the kernels read
    tail_positions: torch.Tensor  # those of flash-attention's keys, likewise


_LAYOUTS: dict[tuple, tuple[list, Layout]] = {}


def layout(query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor, spec: LambdaSpec):
    """`find_layout`, once per set of position tensors: every layer of a forward pass reads the same ones,
    and the host sync is paid once. Cached by identity and version, held by weak references."""
    tensors = (query_positions, key_positions, key_valid)
    key = (*map(id, tensors), spec)
    entry = _LAYOUTS.get(key)
    if entry is not None and all(
        ref() is t and version == t._version for (ref, version), t in zip(entry[0], tensors, strict=True)
    ):
        return entry[1]
    if len(_LAYOUTS) > 64:
        _LAYOUTS.clear()
    found = find_layout(*tensors, spec)
    _LAYOUTS[key] = ([(weakref.ref(t), t._version) for t in tensors], found)
    return found


def find_layout(
    query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor, spec: LambdaSpec
) -> Layout:
    """Where flash-attention's keys start, and what the global part needs; one host sync.

    Flash-attention masks by slot: its keys must be valid, at consecutive positions, ending with the
    queries. They are the longest such run of slots, cut to what the first query's window reaches. A
    valid key before the run must be a global token (a bounded cache's sink slot): the global part
    scores it, at the true distance where it is in a query's window.
    """
    k_len = key_positions.shape[1]
    q_len = query_positions.shape[1]
    slots = torch.arange(k_len, device=key_positions.device)
    breaks = torch.where(~key_valid, slots + 1, 0)
    breaks[:, 1:] = torch.maximum(
        breaks[:, 1:], torch.where(key_positions[:, 1:] != key_positions[:, :-1] + 1, slots[1:], 0)
    )
    run_start = breaks.amax(dim=1)  # (B,): where each row's run begins
    before_run = key_valid & (slots < run_start[:, None])
    is_global = key_valid & (key_positions < spec.n_global)
    big = torch.iinfo(torch.int32).max
    stats = torch.stack(
        [
            t.long()
            for t in (
                run_start.amax(),
                run_start.amin(),
                (before_run & ~is_global).any(),
                (query_positions != key_positions[:, k_len - q_len :]).any(),
                torch.where(is_global, slots + 1, 0).max(),
                torch.where(is_global, key_positions, big).min(),
                torch.where(before_run & is_global, key_positions, NONE).max(),
                query_positions.min(),
                query_positions.max(),
            )
        ]
    )
    last_start, first_start, stray, misplaced, prefix, first_global, last_outside, first_q, last_q = stats.tolist()
    problem = None
    if misplaced or last_start > k_len - q_len or last_start != first_start or stray:
        problem = "padding or gaps among the keys of the queries' windows (a left-padded batch, say)"
    tail = max(last_start, k_len - q_len - spec.window + 1)
    return Layout(
        problem,
        tail,
        prefix,
        first_global,
        last_outside,
        first_q,
        last_q,
        query_positions.to(torch.int32).contiguous(),
        key_positions[:, tail:].to(torch.int32).contiguous(),
    )


def sees_near(keys: Layout, spec: LambdaSpec) -> bool:
    """Whether some query sees a slot before flash-attention's keys inside its window (a bounded cache's sink)."""
    return keys.first_query - spec.window < keys.last_outside


@triton.jit
def _rotated_query(Q, TURNS, row_ptr, ok, pos, scale, HALF: tl.constexpr, LOW: tl.constexpr):
    """Rows of q at `row_ptr` (M,) rotated at `pos` ((M,), or (1,): the same for every row), times `scale`:
    halves (M, HALF), in q's dtype where LOW (as flash-attention multiplies them) else float32, and the
    cos/sin used."""
    offs_h = tl.arange(0, HALF)
    x1 = tl.load(Q + row_ptr[:, None] + offs_h[None, :], mask=ok[:, None], other=0.0)
    x2 = tl.load(Q + row_ptr[:, None] + HALF + offs_h[None, :], mask=ok[:, None], other=0.0)
    cos, sin = cos_sin(pos, TURNS, HALF)
    y1, y2 = rotate(x1.to(tl.float32), x2.to(tl.float32), cos, sin)
    y1 *= scale
    y2 *= scale
    if LOW:  # one return: Triton types every return statement, taken or not
        y1 = y1.to(x1.dtype)
        y2 = y2.to(x1.dtype)
    return y1, y2, cos, sin


@triton.jit
def _key_tiles(K, g_base, P, dtype, HALF: tl.constexpr, P_PAD: tl.constexpr):
    """The global keys' halves (P_PAD, HALF) in `dtype`, zero past the P real ones."""
    offs_p = tl.arange(0, P_PAD)
    ptr = K + g_base + offs_p[:, None] * (2 * HALF) + tl.arange(0, HALF)[None, :]
    live = (offs_p < P)[:, None]
    return tl.load(ptr, mask=live, other=0.0).to(dtype), tl.load(ptr + HALF, mask=live, other=0.0).to(dtype)


@triton.jit
def _scores(x1, x2, k1, k2, PRECISION: tl.constexpr):
    return tl.dot(x1, tl.trans(k1), input_precision=PRECISION) + tl.dot(x2, tl.trans(k2), input_precision=PRECISION)


@triton.jit
def _score_grads(ds, k1, k2, x1, x2, dk1, dk2, cos, sin, PRECISION: tl.constexpr):
    """The transpose of `_scores` for the score gradients ds (M, P_PAD): the query halves' gradients, rotated
    back (the rotation's transpose), and the keys' running sums dk1/dk2 with this block's added."""
    dx1 = tl.dot(ds, k1, input_precision=PRECISION)
    dx2 = tl.dot(ds, k2, input_precision=PRECISION)
    dk1 = tl.dot(tl.trans(ds), x1, dk1, input_precision=PRECISION)
    dk2 = tl.dot(tl.trans(ds), x2, dk2, input_precision=PRECISION)
    dx1, dx2 = rotate(dx1, dx2, cos, -sin)
    return dx1, dx2, dk1, dk2


@triton.jit
def _global_part(
    Q, TURNS, GK, GKN, GV, GPOS, GNEAR, q_rows, ok, qpos, fpos, g_base, gp_off, P, window, q_scale,
    HALF: tl.constexpr, P_PAD: tl.constexpr, HAS_NEAR: tl.constexpr, LOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """A block's rows against every global key at once (M, P_PAD): the query rotated far (f) and near (n)
    with the cos/sin used, the keys, each score -inf where the row does not see that key that way: far
    beyond the window, near (HAS_NEAR: a key flash-attention does not see) at the true distance inside it."""
    offs_p = tl.arange(0, P_PAD)
    never = 2147483647
    f1, f2, f_cos, f_sin = _rotated_query(Q, TURNS, q_rows, ok, fpos, q_scale, HALF, LOW)
    kf1, kf2 = _key_tiles(GK, g_base, P, f1.dtype, HALF, P_PAD)
    g_far = tl.load(GPOS + gp_off + offs_p, mask=offs_p < P, other=never)
    sees = ok[:, None] & (g_far[None, :] <= qpos[:, None] - window)
    s_far = tl.where(sees, _scores(f1, f2, kf1, kf2, PRECISION), float("-inf"))
    n1, n2, n_cos, n_sin, kn1, kn2, s_near = f1, f2, f_cos, f_sin, kf1, kf2, s_far  # read only where HAS_NEAR
    if HAS_NEAR:
        n1, n2, n_cos, n_sin = _rotated_query(Q, TURNS, q_rows, ok, qpos, q_scale, HALF, LOW)
        kn1, kn2 = _key_tiles(GKN, g_base, P, f1.dtype, HALF, P_PAD)
        g_near = tl.load(GNEAR + gp_off + offs_p, mask=offs_p < P, other=never)
        sees = ok[:, None] & (g_near[None, :] > qpos[:, None] - window) & (g_near[None, :] <= qpos[:, None])
        s_near = tl.where(sees, _scores(n1, n2, kn1, kn2, PRECISION), float("-inf"))
    offs_d = tl.arange(0, 2 * HALF)
    v = tl.load(GV + g_base + offs_p[:, None] * (2 * HALF) + offs_d[None, :], mask=(offs_p < P)[:, None], other=0.0)
    return f1, f2, f_cos, f_sin, kf1, kf2, s_far, n1, n2, n_cos, n_sin, kn1, kn2, s_near, v.to(f1.dtype)


@triton.jit
def _block_sees_globals(QPOS, qp_row, start, Lq, window, first_global, last_outside, BLOCK_M: tl.constexpr):
    """Whether some row of the block starting at `start` sees a global key (far, or near before the window)."""
    first = tl.load(QPOS + qp_row + start)
    last = tl.load(QPOS + qp_row + tl.minimum(start + BLOCK_M, Lq) - 1)
    return (last - window >= first_global) | (first - window < last_outside)


@triton.jit
def _program_rows(Hq, group, Lq, BLOCK_M: tl.constexpr):
    """A merge program's block of query rows (grid: row blocks, B·Hq): its ids, batch, query and KV head, the
    rows and which of them exist."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, pid_bh, pid_bh // Hq, h, h // group, rows, rows < Lq


@triton.jit
def _score_fwd(
    Q, QPOS, TURNS, QROT, S, GK, GKN, GV, GPOS, GNEAR,
    sq_b, sq_h, sq_l, sqp_b, sr_b, sr_l, sr_h, sg_b, sg_h, sgp_b,
    Hq, group, Lq, P, window, far_pos, first_global, last_outside, q_scale, rot_scale,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, CAPPED: tl.constexpr, HAS_NEAR: tl.constexpr,
    P_PAD: tl.constexpr, LOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Before flash-attention: q rotated at its positions (QROT, what flash-attention reads) and, on blocks
    that see a global key, the global part's scores S (B·Hq, Lq, P), -inf where a row does not see a key.
    Scoring here, where q is read anyway, leaves the merge only flash-attention's output to read."""
    pid_m, pid_bh, b, h, hk, rows, ok = _program_rows(Hq, group, Lq, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    qpos = tl.load(QPOS + b.to(tl.int64) * sqp_b + rows, mask=ok, other=0)
    q_rows = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + rows.to(tl.int64) * sq_l
    r1, r2, r_cos, r_sin = _rotated_query(Q, TURNS, q_rows, ok, qpos, rot_scale, HALF, False)
    r_off = b.to(tl.int64) * sr_b + rows[:, None].to(tl.int64) * sr_l + h.to(tl.int64) * sr_h + offs_h[None, :]
    tl.store(QROT + r_off, r1.to(QROT.dtype.element_ty), mask=ok[:, None])
    tl.store(QROT + r_off + HALF, r2.to(QROT.dtype.element_ty), mask=ok[:, None])
    if _block_sees_globals(
        QPOS, b.to(tl.int64) * sqp_b, pid_m * BLOCK_M, Lq, window, first_global, last_outside, BLOCK_M
    ):
        if CAPPED:  # one far position for every row: one cos/sin per frequency
            fpos = tl.full([1], far_pos, tl.int32)
        else:
            fpos = tl.minimum(qpos, far_pos)
        part = _global_part(
            Q, TURNS, GK, GKN, GV, GPOS, GNEAR, q_rows, ok, qpos, fpos, b.to(tl.int64) * sg_b + hk.to(tl.int64) * sg_h,
            b.to(tl.int64) * sgp_b, P, window, q_scale, HALF, P_PAD, HAS_NEAR, LOW, PRECISION,
        )  # fmt: skip
        s_far = part[6]
        if HAS_NEAR:  # a key is seen far or near, never both: one score per key
            s_far = tl.where(s_far == float("-inf"), part[13], s_far)
        offs_p = tl.arange(0, P_PAD)
        s_ptr = S + (pid_bh.to(tl.int64) * Lq + rows[:, None]) * P + offs_p[None, :]
        tl.store(s_ptr, s_far, mask=ok[:, None] & (offs_p < P)[None, :])


@triton.jit
def _merge_fwd(
    S, QPOS, OUT, LSE, GV, sqp_b, so_b, so_l, so_h, sg_b, sg_h,
    Hq, group, Lq, P, window, first_global, last_outside,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, P_PAD: tl.constexpr, LOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """OUT and LSE hold the window part and become the merged attention, with the global part's scores S
    (`_score_fwd`) and values: each program reads its rows first."""
    pid_m, pid_bh, b, h, hk, rows, ok = _program_rows(Hq, group, Lq, BLOCK_M)
    if _block_sees_globals(
        QPOS, b.to(tl.int64) * sqp_b, pid_m * BLOCK_M, Lq, window, first_global, last_outside, BLOCK_M
    ):
        offs_d = tl.arange(0, 2 * HALF)
        offs_p = tl.arange(0, P_PAD)
        row_off = b.to(tl.int64) * so_b + rows[:, None].to(tl.int64) * so_l + h.to(tl.int64) * so_h + offs_d[None, :]
        lse_ptr = pid_bh.to(tl.int64) * Lq + rows
        lse_w = tl.load(LSE + lse_ptr, mask=ok, other=0.0)
        live = (offs_p < P)[None, :]
        s_ptr = S + (pid_bh.to(tl.int64) * Lq + rows[:, None]) * P + offs_p[None, :]
        s = tl.load(s_ptr, mask=ok[:, None] & live, other=float("-inf"))
        g_base = b.to(tl.int64) * sg_b + hk.to(tl.int64) * sg_h
        v = tl.load(GV + g_base + offs_p[:, None] * (2 * HALF) + offs_d[None, :], mask=tl.trans(live), other=0.0)
        if LOW:
            v = v.to(OUT.dtype.element_ty)
        m = tl.maximum(lse_w, tl.max(s, 1))
        p = tl.exp(s - m[:, None])
        window_weight = tl.exp(lse_w - m)
        total = window_weight + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        o_w = tl.load(OUT + row_off, mask=ok[:, None], other=0.0).to(tl.float32)
        out = (window_weight[:, None] * o_w + acc) / total[:, None]
        tl.store(OUT + row_off, out.to(OUT.dtype.element_ty), mask=ok[:, None])
        tl.store(LSE + lse_ptr, m + tl.log(total), mask=ok)


@triton.jit
def _merge_bwd(
    Q, QPOS, TURNS, OUT, LSE, DOUT, DQW, GK, GKN, GV, GPOS, GNEAR, DQ, DGK, DGKN, DGV,
    sq_b, sq_h, sq_l, sqp_b, so_b, so_l, so_h, sdo_b, sdo_l, sdo_h, sdw_b, sdw_l, sdw_h, sdq_b, sdq_h, sdq_l,
    sg_b, sg_h, sgp_b,
    Hq, group, Lq, P, window, far_pos, first_global, last_outside, q_scale, rot_scale, n_blocks, blocks_per_program,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, CAPPED: tl.constexpr, HAS_NEAR: tl.constexpr,
    P_PAD: tl.constexpr, LOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The un-rotated query's whole gradient DQ: flash-attention's DQW (the rotated query's, the window part)
    rotated back, plus the global part's; and the global keys' and values' gradients.

    Reading DQW here, rather than rotating it back in a kernel of its own that adds this one's dq, saves
    writing and reading a query-sized tensor.

    A program takes `blocks_per_program` consecutive row blocks of one (b, h) and adds the keys' gradients
    over them in registers; DGK/DGKN/DGV are each program's sums (n_programs, B·Hq, P, D), reduced on the
    host: every program adds to the same few keys, and atomics on them serialise the whole grid."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    offs_d = tl.arange(0, 2 * HALF)
    offs_h = tl.arange(0, HALF)
    offs_p = tl.arange(0, P_PAD)
    g_base = b.to(tl.int64) * sg_b + hk.to(tl.int64) * sg_h
    dgk1 = tl.zeros([P_PAD, HALF], tl.float32)
    dgk2 = tl.zeros([P_PAD, HALF], tl.float32)
    dgn1 = tl.zeros([P_PAD, HALF], tl.float32)
    dgn2 = tl.zeros([P_PAD, HALF], tl.float32)
    dgv = tl.zeros([P_PAD, 2 * HALF], tl.float32)
    first_block = pid_s * blocks_per_program
    for blk in range(first_block, tl.minimum(first_block + blocks_per_program, n_blocks)):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = rows < Lq
        dq_off = b.to(tl.int64) * sdq_b + h.to(tl.int64) * sdq_h + rows[:, None].to(tl.int64) * sdq_l + offs_h[None, :]
        dw_off = b.to(tl.int64) * sdw_b + rows[:, None].to(tl.int64) * sdw_l + h.to(tl.int64) * sdw_h + offs_h[None, :]
        qpos = tl.load(QPOS + b.to(tl.int64) * sqp_b + rows, mask=ok, other=0)
        w_cos, w_sin = cos_sin(qpos, TURNS, HALF)
        dq1, dq2 = rotate(
            tl.load(DQW + dw_off, mask=ok[:, None], other=0.0).to(tl.float32),
            tl.load(DQW + dw_off + HALF, mask=ok[:, None], other=0.0).to(tl.float32),
            w_cos,
            -w_sin,
        )
        dq1 *= rot_scale
        dq2 *= rot_scale
        if _block_sees_globals(
            QPOS, b.to(tl.int64) * sqp_b, blk * BLOCK_M, Lq, window, first_global, last_outside, BLOCK_M
        ):
            row_off = (
                b.to(tl.int64) * so_b + rows[:, None].to(tl.int64) * so_l + h.to(tl.int64) * so_h + offs_d[None, :]
            )
            do_off = (
                b.to(tl.int64) * sdo_b + rows[:, None].to(tl.int64) * sdo_l + h.to(tl.int64) * sdo_h + offs_d[None, :]
            )
            dout = tl.load(DOUT + do_off, mask=ok[:, None], other=0.0)
            out = tl.load(OUT + row_off, mask=ok[:, None], other=0.0)
            delta = tl.sum(dout.to(tl.float32) * out.to(tl.float32), 1)
            lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + rows, mask=ok, other=0.0)
            q_rows = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + rows.to(tl.int64) * sq_l
            if CAPPED:
                fpos = tl.full([1], far_pos, tl.int32)
            else:
                fpos = tl.minimum(qpos, far_pos)
            f1, f2, f_cos, f_sin, kf1, kf2, s_far, n1, n2, n_cos, n_sin, kn1, kn2, s_near, v = _global_part(
                Q, TURNS, GK, GKN, GV, GPOS, GNEAR, q_rows, ok, qpos, fpos, g_base, b.to(tl.int64) * sgp_b, P,
                window, q_scale, HALF, P_PAD, HAS_NEAR, LOW, PRECISION,
            )  # fmt: skip
            dout = dout.to(v.dtype)
            dp = tl.dot(dout, tl.trans(v), input_precision=PRECISION) - delta[:, None]  # (M, P_PAD)
            p = tl.exp(s_far - lse[:, None])
            ds = (p * dp).to(v.dtype)
            df1, df2, dgk1, dgk2 = _score_grads(ds, kf1, kf2, f1, f2, dgk1, dgk2, f_cos, f_sin, PRECISION)
            if HAS_NEAR:
                p_near = tl.exp(s_near - lse[:, None])
                ds = (p_near * dp).to(v.dtype)
                dn1, dn2, dgn1, dgn2 = _score_grads(ds, kn1, kn2, n1, n2, dgn1, dgn2, n_cos, n_sin, PRECISION)
                df1 += dn1
                df2 += dn2
                p += p_near
            dgv = tl.dot(tl.trans(p.to(v.dtype)), dout, dgv, input_precision=PRECISION)
            dq1 += df1 * q_scale
            dq2 += df2 * q_scale
        tl.store(DQ + dq_off, dq1.to(DQ.dtype.element_ty), mask=ok[:, None])
        tl.store(DQ + dq_off + HALF, dq2.to(DQ.dtype.element_ty), mask=ok[:, None])
    part = (pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh) * P * 2 * HALF + offs_p[:, None] * (2 * HALF)
    live = (offs_p < P)[:, None]
    tl.store(DGK + part + offs_h[None, :], dgk1, mask=live)
    tl.store(DGK + part + HALF + offs_h[None, :], dgk2, mask=live)
    tl.store(DGV + part + offs_d[None, :], dgv, mask=live)
    if HAS_NEAR:
        tl.store(DGKN + part + offs_h[None, :], dgn1, mask=live)
        tl.store(DGKN + part + HALF + offs_h[None, :], dgn2, mask=live)


class GlobalKeys(NamedTuple):
    """The prefix slots as the global part reads them: keys rotated at the far key position and at their own
    (B, Hkv, P, D), values (float32), and positions (B, P) where each is seen far (a valid global token) or
    near (one before flash-attention's keys); elsewhere past every query. Built without autograd: their
    gradients are the merge's, taken back by hand (`_LambdaFlash.backward`)."""

    far_keys: torch.Tensor
    near_keys: torch.Tensor
    values: torch.Tensor
    far_positions: torch.Tensor
    near_positions: torch.Tensor


def global_keys(key, value, key_positions, key_valid, keys: Layout, spec: LambdaSpec, rotary: Rotary) -> GlobalKeys:
    positions = key_positions[:, : keys.prefix]
    valid = key_valid[:, : keys.prefix] & (positions < spec.n_global)
    outside = valid & (torch.arange(keys.prefix, device=positions.device) < keys.tail)
    never = torch.iinfo(torch.int32).max
    # both rotations in one launch: far at key position 0 under a distance cap (`far_key_position`; `rope`'s
    # capped far rule), else at the key's own position, as near
    capped, _ = far_rule(spec)
    far = (0, rotary.scale, True) if capped else (never, rotary.scale, False)
    turns = frequency_turns(rotary.inv_freq, key.device)
    near_keys, far_keys = rope(key[:, :, : keys.prefix].float(), positions, turns, rotary.scale, far=far)
    return GlobalKeys(
        far_keys,
        near_keys,
        value[:, :, : keys.prefix].float().contiguous(),
        torch.where(valid, positions, never).to(torch.int32).contiguous(),
        torch.where(outside, positions, never).to(torch.int32).contiguous(),
    )


def global_keys_gradient(d_far, d_near, key_positions, keys: Layout, spec: LambdaSpec, rotary: Rotary):
    """The prefix slots' key gradient (B, Hkv, P, D) from those of their far and near rotations (`global_keys`):
    each rotated back, in one launch or two."""
    positions = key_positions[:, : keys.prefix]
    turns = frequency_turns(rotary.inv_freq, d_far.device)
    capped, _ = far_rule(spec)
    if capped:  # far keys at position 0: no rotation, the scale only
        far = d_far * rotary.scale
    else:
        far = rope(d_far, positions, turns, rotary.scale, inverse=True)[0]
    if d_near is None:
        return far
    return rope(d_near, positions, turns, rotary.scale, inverse=True, add=far)[0]


# (query rows, warps) per program of the merge kernels on a GPU, from `benchmarks/attention/merge_sweep.py` on an
# H100 (Triton 3.6, 64k tokens): score 0.46 ms (every tile within 0.03 but 32 x 8), forward 0.42 ms (64 x 4:
# 0.43, and it spills with Triton 3.9), backward 1.48 ms (64 x 4: 1.63; 32 x 8: 2.64).
MERGE_TILES = {"score": (64, 8), "forward": (64, 8), "backward": (32, 4)}


class _Merge(NamedTuple):
    """What both merge kernels take, in their order."""

    tensors: tuple  # q, its positions, the rotary frequencies; then (after the kernel's own) the global keys
    strides: tuple
    g_strides: tuple
    sizes: tuple
    flags: dict


def _flags(dtype: torch.dtype, dim: int, keys: Layout, rows: int) -> dict:
    """The constexprs every merge kernel takes."""
    return dict(
        HALF=dim // 2,
        BLOCK_M=16 if interpreting() else rows,
        P_PAD=max(16, triton.next_power_of_2(keys.prefix)),  # every global key in one tensor-core tile
        # the products in q's dtype, as flash-attention's; not under the interpreter, which multiplies
        # bfloat16 tiles wrongly (Triton 3.9)
        LOW=dtype != torch.float32 and not interpreting(),
        PRECISION=dot_precision(dtype),
    )


def _merge_args(query, query_positions, g: GlobalKeys, keys: Layout, spec, rotary: Rotary, scaling, rows) -> _Merge:
    """What the kernels that score q against the global keys take (`_score_fwd`, `_merge_bwd`)."""
    capped, far_pos = far_rule(spec)
    batch, q_heads, q_len, dim = query.shape
    sizes = (q_heads, q_heads // g.far_keys.shape[1], q_len, keys.prefix, spec.window, far_pos)
    sizes += (keys.first_global, keys.last_outside, rotary.scale * scaling)
    flags = _flags(query.dtype, dim, keys, rows) | dict(CAPPED=capped, HAS_NEAR=sees_near(keys, spec))
    return _Merge(
        (query, query_positions, frequency_turns(rotary.inv_freq, query.device)),
        (*query.stride()[:3], query_positions.stride(0)),
        (g.far_keys.stride(0), g.far_keys.stride(1), g.far_positions.stride(0)),
        sizes,
        flags,
    )


def score_forward(query, query_positions, g: GlobalKeys, keys, spec, rotary, scaling):
    """q rotated at its positions, (B, Lq, Hq, D) contiguous as flash-attention reads it, and the global
    part's scores (B·Hq, Lq, P) float32 (written on the row blocks that see a global key)."""
    rows, warps = MERGE_TILES["score"]
    batch, q_heads, q_len, dim = query.shape
    a = _merge_args(query, query_positions, g, keys, spec, rotary, scaling, rows)
    q_rot = query.new_empty(batch, q_len, q_heads, dim)
    scores = query.new_empty(batch * q_heads, q_len, keys.prefix, dtype=torch.float32)
    grid = (triton.cdiv(q_len, a.flags["BLOCK_M"]), batch * q_heads)
    _score_fwd[grid](
        *a.tensors, q_rot, scores, *g, *a.strides, q_rot.stride(0), q_rot.stride(1), q_rot.stride(2), *a.g_strides,
        *a.sizes, rotary.scale, **a.flags, num_warps=warps,
    )  # fmt: skip
    return q_rot, scores


def merge_forward(scores, query_positions, out, lse, g: GlobalKeys, keys, spec) -> None:
    """Merges the global part (its `scores` from `score_forward`) into flash-attention's `out` (B, Lq, Hq, D)
    and `lse` (B, Hq, Lq), in place."""
    rows, warps = MERGE_TILES["forward"]
    batch, q_len, q_heads, dim = out.shape
    flags = _flags(out.dtype, dim, keys, rows)
    grid = (triton.cdiv(q_len, flags["BLOCK_M"]), batch * q_heads)
    _merge_fwd[grid](
        scores, query_positions, out, lse, g.values, query_positions.stride(0), *out.stride()[:3],
        *g.values.stride()[:2], q_heads, q_heads // g.values.shape[1], q_len, keys.prefix, spec.window,
        keys.first_global, keys.last_outside, **flags, num_warps=warps,
    )  # fmt: skip


def merge_backward(query, query_positions, out, lse, dout, dq_window, g: GlobalKeys, keys, spec, rotary, scaling):
    """The un-rotated query's gradient (like query), from flash-attention's `dq_window` (B, Lq, Hq, D) of the
    rotated query and the global part's; and the global keys' (far; near, None where no query sees one) and
    values' gradients."""
    rows, warps = MERGE_TILES["backward"]
    a = _merge_args(query, query_positions, g, keys, spec, rotary, scaling, rows)
    batch, q_heads, q_len, _ = query.shape
    n_blocks = triton.cdiv(q_len, a.flags["BLOCK_M"])
    # a few waves of programs, each adding the keys' gradients over a run of blocks
    programs = 2 if interpreting() else 8 * sm_count(query.device.index or 0)
    per_program = triton.cdiv(n_blocks, max(1, triton.cdiv(programs, batch * q_heads)))
    grid = (triton.cdiv(n_blocks, per_program), batch * q_heads)
    dq = torch.empty_like(query)
    kv_heads, prefix, dim = g.far_keys.shape[1:]
    sums = (grid[0], batch, kv_heads, q_heads // kv_heads, prefix, dim)  # per program
    d_far, d_values = (query.new_empty(sums, dtype=torch.float32) for _ in range(2))
    d_near = query.new_empty(sums if a.flags["HAS_NEAR"] else (1,), dtype=torch.float32)
    _merge_bwd[grid](
        *a.tensors, out, lse, dout, dq_window, *g, dq, d_far, d_near, d_values, *a.strides, *out.stride()[:3],
        *dout.stride()[:3], *dq_window.stride()[:3], *dq.stride()[:3], *a.g_strides, *a.sizes, rotary.scale,
        n_blocks, per_program, **a.flags, num_warps=warps,
    )  # fmt: skip
    d_near = d_near.sum((0, 3)) if a.flags["HAS_NEAR"] else None
    return dq, d_far.sum((0, 3)), d_near, d_values.sum((0, 3))


class PendingGradient:
    """A gradient one autograd node computes for another's input, added where that one's is written: to all
    of it, or (a shorter tensor) to its first rows. One path into each input: no full-size zeros and sums."""

    value: torch.Tensor | None = None


class _Rotate(torch.autograd.Function):
    """k (B, H, L, D) rotated at its positions, as (B, L, H, D) contiguous: what flash-attention reads.
    Backward: the gradient rotated back, plus `pending` (the merge's gradient of the same input)."""

    @staticmethod
    def forward(ctx, x, positions, turns, scale, pending):
        out, _ = rope(x, positions, turns, scale, seq_major=True)
        ctx.save_for_backward(positions, turns)
        ctx.scale, ctx.pending = scale, pending
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        positions, turns = ctx.saved_tensors
        (grad,) = unit_last(grad)
        grad = grad.transpose(1, 2)
        add = ctx.pending.value
        whole = add is not None and add.shape == grad.shape
        dx, _ = rope(grad, positions, turns, ctx.scale, seq_major=True, inverse=True, add=add if whole else None)
        if add is not None and not whole:
            dx[:, :, : add.shape[2]] += add
        return dx, None, None, None, None


def _slots_gradient(window_part, prefix_part, shape: torch.Size, tail: int) -> torch.Tensor:
    """The gradient of all key or value slots (`shape`) from flash-attention's part (slots [tail, Lk)) and the
    global part's (slots [0, P), or None); a prefill has tail 0, a bounded cache's chunk not."""
    full = window_part
    if tail:
        full = window_part.new_zeros(shape)
        full[:, :, tail:] = window_part
    if prefix_part is not None:
        full[:, :, : prefix_part.shape[2]] += prefix_part
    return full


class _LambdaFlash(torch.autograd.Function):
    """The query's rotation, the window part and the merge, differentiable. The merge's backward kernel
    writes the query's whole gradient; the global part's gradient of the keys (in a prefill) goes to
    `k_grad` (a `PendingGradient`), which k's rotation adds to its own in the same pass; the values' is
    added to flash-attention's dv."""

    @staticmethod
    def forward(ctx, query, k_rot, key, value, *args):
        key_positions, key_valid, keys, spec, rotary, scaling, k_grad, window = args
        turns = frequency_turns(rotary.inv_freq, query.device)
        far = keys.prefix > 0 and keys.last_query - spec.window >= keys.first_global
        merges = far or sees_near(keys, spec)  # else the window part is everything every query sees
        g = None
        if merges:
            g = global_keys(key, value, key_positions, key_valid, keys, spec, rotary)
            q_rot, scores = score_forward(query, keys.query_positions, g, keys, spec, rotary, scaling)
        else:
            q_rot = rope(query, keys.query_positions, turns, rotary.scale, seq_major=True)[0].transpose(1, 2)
        v_tail = value[:, :, keys.tail :].transpose(1, 2)  # flash-attention copies it only if it must
        out, lse = window.forward(q_rot, k_rot, v_tail, spec.window, scaling)
        if merges:
            merge_forward(scores, keys.query_positions, out, lse, g, keys, spec)
        ctx.save_for_backward(q_rot, k_rot, v_tail, out, lse, query, key_positions, turns, *(g or ()))
        ctx.args = (keys, spec, rotary, scaling, k_grad, window, merges)
        ctx.slots_shape = value.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        keys, spec, rotary, scaling, k_grad, window, merges = ctx.args
        q_rot, k_rot, v_tail, out, lse, query, key_positions, turns, *g = ctx.saved_tensors
        (dout,) = unit_last(dout)
        dq_window, dk, dv = window.backward(q_rot, k_rot, v_tail, out, dout, lse, spec.window, scaling)
        dv, d_values, dkey = dv.transpose(1, 2), None, None
        if not merges:
            dq, _ = rope(dq_window.transpose(1, 2), keys.query_positions, turns, rotary.scale, inverse=True)
        else:
            g = GlobalKeys(*g)
            dq, d_far, d_near, d_values = merge_backward(
                query, keys.query_positions, out, lse, dout, dq_window, g, keys, spec, rotary, scaling
            )
            d_prefix = global_keys_gradient(d_far, d_near, key_positions, keys, spec, rotary).to(dv.dtype)
            d_values = d_values.to(dv.dtype)
            if keys.tail == 0:  # k's rotation writes every key's gradient: it adds the prefix's
                k_grad.value = d_prefix
            else:  # a bounded cache's chunk: the sink slots are not flash-attention's keys
                dkey = d_prefix.new_zeros(ctx.slots_shape)
                dkey[:, :, : keys.prefix] = d_prefix
        dv = _slots_gradient(dv, d_values, ctx.slots_shape, keys.tail)
        return dq, dk, dkey, dv, *[None] * 8


def lambda_attention_flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    spec: LambdaSpec,
    rotary: Rotary,
    scaling: float,
    keys: Layout,
    window_attention: WindowAttention = FLASH_WINDOW,
) -> torch.Tensor:
    """Λ attention over un-rotated q/k with the reference's arguments and result (B, Lq, Hq, D), for keys
    in stream order whose `layout` (`keys`) has no problem. No softcap, no dropout.
    """
    turns = frequency_turns(rotary.inv_freq, query.device)
    k_grad = PendingGradient()
    k_rot = _Rotate.apply(key[:, :, keys.tail :], keys.tail_positions, turns, rotary.scale, k_grad)
    args = (key_positions, key_valid, keys, spec, rotary, scaling, k_grad)
    return _LambdaFlash.apply(query, k_rot, key, value, *args, window_attention)
