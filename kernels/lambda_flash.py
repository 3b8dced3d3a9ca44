"""Λ attention on flash-attention: the window in one flash-attention call, the global keys merged by log-sum-exp.

Every visible (i, j) pair belongs to exactly one of

- the *window part*: 0 <= i - j < window, rotated at the true distance. With q and k rotated at their
  positions this is flash-attention's causal sliding window (window_size = (window - 1, 0)), which
  returns its log-sum-exp (and takes a gradient through it);
- the *global part*: j < n_global and i - j >= window, rotated at the method's far positions: at most
  n_global keys per query, scored here in a small Triton kernel that also merges the two softmaxes:

      out = (e^(lse_w - m) o_w + sum_g e^(s_g - m) v_g) / Z,      lse = m + log Z

The backward runs the same kernel's transpose: it hands flash-attention d o_w = a dout and
d lse_w = a (dout · o_w - dout · out), a = e^(lse_w - lse), which is exactly the window part's share of
the full softmax's gradient, and computes the global keys' gradients itself.

Flash-attention masks by slot, not by position: its keys are the run of valid slots at consecutive
positions that ends with the queries (`layout` finds it, and says why a call has none: a left-padded
batch, say); keys must be in stream order (not a ring buffer). A bounded cache's sink slots lie before
that run: the global part scores them too, at the true distance where they are inside a window. The engine takes `window_attention`, the one call it makes to
flash-attention, as an argument: `window_attention_reference` is a plain PyTorch stand-in, so the merge
is tested against `lambda_reference` on any device.
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
from .utils import interpreting, unit_last

# (q rotated, k rotated, v, window, scale) -> (out, lse): q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D), causal with
# the queries as the last Lq keys, keys i - j < window; out like q, lse (B, Hq, Lq) float32, natural log.
WindowAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def window_attention_flash(q, k, v, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn-4's sliding window (Hopper and Blackwell GPUs)."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=(window - 1, 0), return_lse=True)


def window_attention_reference(q, k, v, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sliding window in plain PyTorch, O(Lq x Lk) memory: a stand-in for tests on any device."""
    q_len, k_len = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    qf = q.transpose(1, 2).float()
    kf, vf = (t.transpose(1, 2).float().repeat_interleave(group, 1) for t in (k, v))
    i = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=q.device)[None, :]
    scores = (qf @ kf.transpose(-1, -2) * scale).masked_fill((j > i) | (i - j >= window), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ vf
    return out.transpose(1, 2).to(q.dtype), lse


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
def _rotated_query(Q, TURNS, row_ptr, ok, pos, scale, HALF):
    """Rows of q at `row_ptr` (M,) rotated at `pos`, times `scale`: halves (M, HALF) and the cos/sin used."""
    offs_h = tl.arange(0, HALF)
    x1 = tl.load(Q + row_ptr[:, None] + offs_h[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(Q + row_ptr[:, None] + HALF + offs_h[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    cos, sin = cos_sin(pos, TURNS, HALF)
    y1, y2 = rotate(x1, x2, cos, sin)
    return y1 * scale, y2 * scale, cos, sin


@triton.jit
def _global_scores(
    f1, f2, n1, n2, qpos, ok, GK, GKN, GPOS, GNEAR, g_off, gp_off, g, window, HALF: tl.constexpr, HAS_NEAR: tl.constexpr
):  # fmt: skip
    """Scores (M,) of global key g for every row: at the far positions beyond the window, at the true
    distance inside it for a key flash-attention does not see (HAS_NEAR); -inf where not visible."""
    offs_h = tl.arange(0, HALF)
    k1 = tl.load(GK + g_off + offs_h)
    k2 = tl.load(GK + g_off + HALF + offs_h)
    far = tl.sum(f1 * k1[None, :], 1) + tl.sum(f2 * k2[None, :], 1)
    g_far = tl.load(GPOS + gp_off + g)
    s = tl.where(g_far <= qpos - window, far, float("-inf"))
    if HAS_NEAR:
        k1 = tl.load(GKN + g_off + offs_h)
        k2 = tl.load(GKN + g_off + HALF + offs_h)
        near = tl.sum(n1 * k1[None, :], 1) + tl.sum(n2 * k2[None, :], 1)
        g_near = tl.load(GNEAR + gp_off + g)
        s = tl.where((g_near > qpos - window) & (g_near <= qpos), near, s)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _merge_fwd(
    Q, QPOS, TURNS, OW, LSEW, GK, GKN, GV, GPOS, GNEAR, OUT, LSE,
    sq_b, sq_h, sq_l, sqp_b, so_b, so_l, so_h, sg_b, sg_h, sgp_b,
    Hq, group, Lq, P, window, far_pos, first_global, last_outside, rot_scale, scaling,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, CAPPED: tl.constexpr, HAS_NEAR: tl.constexpr,
    IN_PLACE: tl.constexpr, NEED_LSE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < Lq
    offs_d = tl.arange(0, 2 * HALF)
    row_off = b.to(tl.int64) * so_b + rows[:, None].to(tl.int64) * so_l + h.to(tl.int64) * so_h + offs_d[None, :]
    lse_ptr = pid_bh.to(tl.int64) * Lq + rows
    lse_w = tl.load(LSEW + lse_ptr, mask=ok, other=0.0)
    qpos = tl.load(QPOS + b.to(tl.int64) * sqp_b + rows, mask=ok, other=0)
    first = tl.load(QPOS + b.to(tl.int64) * sqp_b + pid_m * BLOCK_M)
    last = tl.load(QPOS + b.to(tl.int64) * sqp_b + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) - 1)
    if (last - window >= first_global) | (first - window < last_outside):  # some row sees a global key here
        q_rows = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + rows.to(tl.int64) * sq_l
        if CAPPED:
            fpos = qpos * 0 + far_pos
        else:
            fpos = tl.minimum(qpos, far_pos)
        f1, f2, _, _ = _rotated_query(Q, TURNS, q_rows, ok, fpos, rot_scale * scaling, HALF)
        n1, n2 = f1, f2  # read only where HAS_NEAR
        if HAS_NEAR:
            n1, n2, _, _ = _rotated_query(Q, TURNS, q_rows, ok, qpos, rot_scale * scaling, HALF)
        m = lse_w
        window_weight = tl.full([BLOCK_M], 1.0, tl.float32)
        total = tl.full([BLOCK_M], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_M, 2 * HALF], tl.float32)
        g_base = b.to(tl.int64) * sg_b + hk.to(tl.int64) * sg_h
        gp_off = b.to(tl.int64) * sgp_b
        for g in range(P):
            g_off = g_base + g * 2 * HALF
            s = _global_scores(f1, f2, n1, n2, qpos, ok, GK, GKN, GPOS, GNEAR, g_off, gp_off, g, window, HALF, HAS_NEAR)
            v = tl.load(GV + g_off + offs_d)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            w = tl.exp(s - m_new)
            window_weight *= alpha
            total = total * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * v[None, :]
            m = m_new
        o_w = tl.load(OW + row_off, mask=ok[:, None], other=0.0).to(tl.float32)
        out = (window_weight[:, None] * o_w + acc) / total[:, None]
        tl.store(OUT + row_off, out.to(OUT.dtype.element_ty), mask=ok[:, None])
        if NEED_LSE:
            tl.store(LSE + lse_ptr, m + tl.log(total), mask=ok)
    else:
        if not IN_PLACE:
            tl.store(OUT + row_off, tl.load(OW + row_off, mask=ok[:, None], other=0.0), mask=ok[:, None])
        if NEED_LSE:
            tl.store(LSE + lse_ptr, lse_w, mask=ok)


@triton.jit
def _merge_bwd(
    Q, QPOS, TURNS, OW, LSEW, OUT, LSE, DOUT, GK, GKN, GV, GPOS, GNEAR, DOW, DLSEW, DQ, DGK, DGKN, DGV,
    sq_b, sq_h, sq_l, sqp_b, so_b, so_l, so_h, sdo_b, sdo_l, sdo_h, sdq_b, sdq_h, sdq_l, sg_b, sg_h, sgp_b,
    Hq, group, Lq, P, window, far_pos, first_global, last_outside, rot_scale, scaling,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, CAPPED: tl.constexpr, HAS_NEAR: tl.constexpr,
):  # fmt: skip
    """DGK/DGKN/DGV are this program's own sums (n_blocks, B·Hq, P, D), reduced on the host: every program
    adds to the same few keys, and atomics on them serialise the whole grid."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < Lq
    offs_d = tl.arange(0, 2 * HALF)
    offs_h = tl.arange(0, HALF)
    row_off = b.to(tl.int64) * so_b + rows[:, None].to(tl.int64) * so_l + h.to(tl.int64) * so_h + offs_d[None, :]
    do_off = b.to(tl.int64) * sdo_b + rows[:, None].to(tl.int64) * sdo_l + h.to(tl.int64) * sdo_h + offs_d[None, :]
    dq_off = b.to(tl.int64) * sdq_b + h.to(tl.int64) * sdq_h + rows[:, None].to(tl.int64) * sdq_l + offs_h[None, :]
    lse_ptr = pid_bh.to(tl.int64) * Lq + rows
    part = (pid_m.to(tl.int64) * tl.num_programs(1) + pid_bh) * P * 2 * HALF  # this program's sums
    dout = tl.load(DOUT + do_off, mask=ok[:, None], other=0.0).to(tl.float32)
    qpos = tl.load(QPOS + b.to(tl.int64) * sqp_b + rows, mask=ok, other=0)
    first = tl.load(QPOS + b.to(tl.int64) * sqp_b + pid_m * BLOCK_M)
    last = tl.load(QPOS + b.to(tl.int64) * sqp_b + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) - 1)
    if (last - window >= first_global) | (first - window < last_outside):
        out = tl.load(OUT + row_off, mask=ok[:, None], other=0.0).to(tl.float32)
        o_w = tl.load(OW + row_off, mask=ok[:, None], other=0.0).to(tl.float32)
        lse = tl.load(LSE + lse_ptr, mask=ok, other=0.0)
        lse_w = tl.load(LSEW + lse_ptr, mask=ok, other=0.0)
        delta = tl.sum(dout * out, 1)
        a = tl.exp(lse_w - lse)  # the window part's share of the softmax
        tl.store(DOW + row_off, (a[:, None] * dout).to(DOW.dtype.element_ty), mask=ok[:, None])
        tl.store(DLSEW + lse_ptr, a * (tl.sum(dout * o_w, 1) - delta), mask=ok)

        q_rows = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + rows.to(tl.int64) * sq_l
        if CAPPED:
            fpos = qpos * 0 + far_pos
        else:
            fpos = tl.minimum(qpos, far_pos)
        f1, f2, f_cos, f_sin = _rotated_query(Q, TURNS, q_rows, ok, fpos, rot_scale * scaling, HALF)
        n1, n2, n_cos, n_sin = f1, f2, f_cos, f_sin  # read only where HAS_NEAR
        if HAS_NEAR:
            n1, n2, n_cos, n_sin = _rotated_query(Q, TURNS, q_rows, ok, qpos, rot_scale * scaling, HALF)
        df1 = tl.zeros([BLOCK_M, HALF], tl.float32)
        df2 = tl.zeros([BLOCK_M, HALF], tl.float32)
        dn1 = tl.zeros([BLOCK_M, HALF], tl.float32)
        dn2 = tl.zeros([BLOCK_M, HALF], tl.float32)
        g_base = b.to(tl.int64) * sg_b + hk.to(tl.int64) * sg_h
        gp_off = b.to(tl.int64) * sgp_b
        for g in range(P):
            g_off = g_base + g * 2 * HALF
            d_off = part + g * 2 * HALF
            g_far = tl.load(GPOS + gp_off + g)
            s = _global_scores(f1, f2, n1, n2, qpos, ok, GK, GKN, GPOS, GNEAR, g_off, gp_off, g, window, HALF, HAS_NEAR)
            v = tl.load(GV + g_off + offs_d)
            p = tl.where(s > float("-inf"), tl.exp(s - lse), 0.0)
            ds = p * (tl.sum(dout * v[None, :], 1) - delta)
            ds_far = tl.where(g_far <= qpos - window, ds, 0.0)
            k1 = tl.load(GK + g_off + offs_h)
            k2 = tl.load(GK + g_off + HALF + offs_h)
            df1 += ds_far[:, None] * k1[None, :]
            df2 += ds_far[:, None] * k2[None, :]
            tl.store(DGK + d_off + offs_h, tl.sum(ds_far[:, None] * f1, 0))
            tl.store(DGK + d_off + HALF + offs_h, tl.sum(ds_far[:, None] * f2, 0))
            tl.store(DGV + d_off + offs_d, tl.sum(p[:, None] * dout, 0))
            if HAS_NEAR:
                ds_near = ds - ds_far
                k1 = tl.load(GKN + g_off + offs_h)
                k2 = tl.load(GKN + g_off + HALF + offs_h)
                dn1 += ds_near[:, None] * k1[None, :]
                dn2 += ds_near[:, None] * k2[None, :]
                tl.store(DGKN + d_off + offs_h, tl.sum(ds_near[:, None] * n1, 0))
                tl.store(DGKN + d_off + HALF + offs_h, tl.sum(ds_near[:, None] * n2, 0))
        # back through each rotation (its transpose: minus the angle) and the scales
        df1, df2 = rotate(df1, df2, f_cos, -f_sin)
        if HAS_NEAR:
            dn1, dn2 = rotate(dn1, dn2, n_cos, -n_sin)
        scale = rot_scale * scaling
        tl.store(DQ + dq_off, ((df1 + dn1) * scale).to(DQ.dtype.element_ty), mask=ok[:, None])
        tl.store(DQ + dq_off + HALF, ((df2 + dn2) * scale).to(DQ.dtype.element_ty), mask=ok[:, None])
    else:  # the window part is the whole softmax: its gradient passes through unchanged
        tl.store(DOW + row_off, dout.to(DOW.dtype.element_ty), mask=ok[:, None])
        tl.store(DLSEW + lse_ptr, tl.zeros([BLOCK_M], tl.float32), mask=ok)
        tl.store(DQ + dq_off, tl.zeros([BLOCK_M, HALF], DQ.dtype.element_ty), mask=ok[:, None])
        tl.store(DQ + dq_off + HALF, tl.zeros([BLOCK_M, HALF], DQ.dtype.element_ty), mask=ok[:, None])
        for g in range(P):
            d_off = part + g * 2 * HALF
            tl.store(DGK + d_off + offs_d, tl.zeros([2 * HALF], tl.float32))
            tl.store(DGV + d_off + offs_d, tl.zeros([2 * HALF], tl.float32))
            if HAS_NEAR:
                tl.store(DGKN + d_off + offs_d, tl.zeros([2 * HALF], tl.float32))


class GlobalKeys(NamedTuple):
    """The prefix slots as the global part reads them: keys rotated at the far key position and at their own
    (B, Hkv, P, D), values (float32, autograd through all three), and positions (B, P) where each is seen
    far (a valid global token) or near (one before flash-attention's keys); elsewhere past every query."""

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
    k = key[:, :, : keys.prefix]
    return GlobalKeys(
        rotary.rotate(k, spec.far_key_position(positions)).contiguous(),
        rotary.rotate(k, positions).contiguous(),
        value[:, :, : keys.prefix].float().contiguous(),
        torch.where(valid, positions, never).to(torch.int32).contiguous(),
        torch.where(outside, positions, never).to(torch.int32).contiguous(),
    )


def _launch(query, query_positions, o_w, g: GlobalKeys, keys: Layout, spec: LambdaSpec, rotary: Rotary, scaling):
    """Grid and the arguments both merge kernels share, in their order."""
    capped, far_pos = far_rule(spec)
    batch, q_heads, q_len, dim = query.shape
    block = 16 if interpreting() else 64
    grid = (triton.cdiv(q_len, block), batch * q_heads)
    tensors = (query, query_positions, frequency_turns(rotary.inv_freq, query.device))
    strides = (*query.stride()[:3], query_positions.stride(0), o_w.stride(0), o_w.stride(1), o_w.stride(2))
    g_strides = (g.far_keys.stride(0), g.far_keys.stride(1), g.far_positions.stride(0))
    sizes = (q_heads, q_heads // g.far_keys.shape[1], q_len, keys.prefix, spec.window, far_pos)
    sizes += (keys.first_global, keys.last_outside, rotary.scale, scaling)
    flags = dict(HALF=dim // 2, BLOCK_M=block, CAPPED=capped, HAS_NEAR=sees_near(keys, spec))
    return grid, tensors, strides, g_strides, sizes, flags


def merge_forward(query, query_positions, o_w, lse_w, g: GlobalKeys, keys, spec, rotary, scaling, in_place):
    """The merged output (B, Lq, Hq, D) (o_w itself when in_place) and, unless in place, its log-sum-exp."""
    grid, tensors, strides, g_strides, sizes, flags = _launch(
        query, query_positions, o_w, g, keys, spec, rotary, scaling
    )
    out = o_w if in_place else torch.empty_like(o_w)
    lse = lse_w if in_place else torch.empty_like(lse_w)
    _merge_fwd[grid](
        *tensors, o_w, lse_w, g.far_keys, g.near_keys, g.values, g.far_positions, g.near_positions, out, lse,
        *strides, *g_strides, *sizes, IN_PLACE=in_place, NEED_LSE=not in_place, **flags, num_warps=4,
    )  # fmt: skip
    return out, None if in_place else lse


class _GlobalMerge(torch.autograd.Function):
    """The merge, differentiable. The query's gradient goes to `q_grad` (a `PendingGradient`), which the
    rotation into flash-attention's layout adds to its own in the same pass."""

    @staticmethod
    def forward(ctx, o_w, lse_w, query, far_keys, near_keys, values, far_positions, near_positions, *args):
        query_positions, keys, spec, rotary, scaling, q_grad = args
        g = GlobalKeys(far_keys, near_keys, values, far_positions, near_positions)
        out, lse = merge_forward(query, query_positions, o_w, lse_w, g, keys, spec, rotary, scaling, False)
        ctx.save_for_backward(o_w, lse_w, query, *g, query_positions, out, lse)
        ctx.args = (keys, spec, rotary, scaling)
        ctx.q_grad = q_grad
        return out

    @staticmethod
    def backward(ctx, dout):
        o_w, lse_w, query, *g, query_positions, out, lse = ctx.saved_tensors
        g = GlobalKeys(*g)
        (dout,) = unit_last(dout)
        grid, tensors, strides, g_strides, sizes, flags = _launch(query, query_positions, o_w, g, *ctx.args)
        d_ow, dlse_w = torch.empty_like(o_w), torch.empty_like(lse_w)
        dq = torch.empty_like(query)
        batch, kv_heads, prefix, dim = g.far_keys.shape
        sums = (grid[0], batch, kv_heads, query.shape[1] // kv_heads, prefix, dim)  # per program
        d_far, d_values = (query.new_empty(sums, dtype=torch.float32) for _ in range(2))
        d_near = query.new_empty(sums if flags["HAS_NEAR"] else (1,), dtype=torch.float32)
        _merge_bwd[grid](
            *tensors, o_w, lse_w, out, lse, dout, g.far_keys, g.near_keys, g.values, g.far_positions,
            g.near_positions, d_ow, dlse_w, dq, d_far, d_near, d_values,
            *strides, *dout.stride()[:3], *dq.stride()[:3], *g_strides, *sizes, **flags, num_warps=8,
        )  # fmt: skip
        ctx.q_grad.value = dq
        d_near = d_near.sum((0, 3)) if flags["HAS_NEAR"] else torch.zeros_like(g.near_keys)
        return d_ow, dlse_w, None, d_far.sum((0, 3)), d_near, d_values.sum((0, 3)), *[None] * 12


class PendingGradient:
    """A gradient one autograd node computes for another's input, to be added where that one's is written."""

    value: torch.Tensor | None = None


class _Rotate(torch.autograd.Function):
    """q or k (B, H, L, D) rotated at its positions, as (B, L, H, D) contiguous: what flash-attention reads.
    Backward: the gradient rotated back, plus `pending` (the merge's gradient of the same q) in one pass."""

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
        add = ctx.pending.value if ctx.pending is not None else None
        dx, _ = rope(grad.transpose(1, 2), positions, turns, ctx.scale, seq_major=True, inverse=True, add=add)
        return dx, None, None, None, None


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
    window_attention: WindowAttention = window_attention_flash,
) -> torch.Tensor:
    """Λ attention over un-rotated q/k with the reference's arguments and result (B, Lq, Hq, D), for keys
    in stream order whose `layout` (`keys`) has no problem. No softcap, no dropout.
    """
    turns = frequency_turns(rotary.inv_freq, query.device)
    query_positions, tail_positions = keys.query_positions, keys.tail_positions
    q_grad = PendingGradient()
    q_rot = _Rotate.apply(query, query_positions, turns, rotary.scale, q_grad)
    k_rot = _Rotate.apply(key[:, :, keys.tail :], tail_positions, turns, rotary.scale, None)
    v_tail = value[:, :, keys.tail :].transpose(1, 2)  # flash-attention copies it only if it must
    o_w, lse_w = window_attention(q_rot, k_rot, v_tail, spec.window, scaling)
    far = keys.prefix > 0 and keys.last_query - spec.window >= keys.first_global
    if not (far or sees_near(keys, spec)):
        return o_w  # the window part is everything every query sees

    g = global_keys(key, value, key_positions, key_valid, keys, spec, rotary)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (o_w, lse_w, query, *g[:3]))):
        out, _ = merge_forward(query, query_positions, o_w, lse_w, g, keys, spec, rotary, scaling, in_place=True)
        return out
    return _GlobalMerge.apply(o_w, lse_w, query, *g, query_positions, keys, spec, rotary, scaling, q_grad)
