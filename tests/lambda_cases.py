"""Λ-attention test cases shared by every engine's tests (Triton kernels, SDPA split): shapes, the
key layouts a prefill and a bounded cache produce, and the comparison with the reference.

With LCPATCH_TEST_FULL=1 (a CUDA machine) the cases are real-sized and run on the GPU.
Errors are compared as RMSE(engine - reference) / RMSE(reference), as flash-linear-attention does
(or pass outright when the largest absolute error is below 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kernel_mode import DEVICE, FULL

from lcpatch.kernels.lambda_reference import lambda_attention_reference
from lcpatch.kernels.specs import LambdaSpec, Rotary

# Error ratios (RMSE ratio), ~3x over what the kernels measured (H100: bfloat16 <= 5.7e-3, float16
# <= 5e-4, float32 max abs error < 1e-5). The interpreter truncates float32 -> bfloat16 instead of
# rounding, which about doubles the bfloat16 error on CPU.
BF16 = (1.5e-2, 2e-2) if FULL else (2.5e-2, 3.5e-2)
TOLERANCE = (
    {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: BF16[0]},
    {torch.float32: 2e-4, torch.float16: 6e-3, torch.bfloat16: BF16[1]},
)


@dataclass(frozen=True)
class Case:
    name: str
    q_len: int
    k_len: int
    window: int
    n_global: int = 4
    capped: bool = True  # LM-Infinite (max_distance) or StreamingLLM (in-cache positions)
    max_distance: int | None = None  # default: window
    batch: int = 1
    kv_heads: int = 1
    group: int = 1
    dim: int = 64
    dtype: torch.dtype = torch.float32
    pad: int = 0  # left padding of the last batch row
    softcap: float | None = None
    offset: int = 0  # added to every position

    @property
    def spec(self) -> LambdaSpec:
        if not self.capped:
            return LambdaSpec(self.n_global, self.window, None)
        return LambdaSpec(self.n_global, self.window, self.max_distance or self.window)


SMALL = [
    Case("len1", 1, 1, 16, batch=2, kv_heads=2),
    Case("len63-gqa4-pad35", 63, 63, 16, batch=2, group=4, pad=35),
    Case("len63-gqa8-d128-bf16", 63, 63, 24, n_global=2, group=8, dim=128, dtype=torch.bfloat16),
    Case("len257-streaming-fp16-pad", 257, 257, 48, capped=False, kv_heads=2, dtype=torch.float16, pad=9),
    Case("len257-within-window-d128", 257, 257, 300, group=2, dim=128),
    Case("chunk33-of-97-streaming-bf16", 33, 97, 40, capped=False, batch=2, group=2, dtype=torch.bfloat16, pad=3),
    Case("softcap", 63, 63, 16, group=2, softcap=2.0),
    Case("max-distance-2.5x", 200, 200, 70, max_distance=175, group=2),
    Case("positions-1e6-no-globals", 100, 100, 20, n_global=0, offset=1_000_003),
]
FULL_CASES = [
    Case("len1", 1, 1, 4096, batch=2, kv_heads=8, group=4, dim=128, dtype=torch.bfloat16),
    Case(
        "len4097-gqa4-pad-bf16", 4097, 4097, 1024, batch=2, kv_heads=8, group=4, dim=128, dtype=torch.bfloat16, pad=77
    ),
    Case("len8191-streaming-gqa8-fp16", 8191, 8191, 2048, capped=False, kv_heads=2, group=8, dtype=torch.float16),
    Case("len1025-within-window-fp32", 1025, 1025, 2048, kv_heads=2, dim=128),
    Case("len3000-fp32-pad", 3000, 3000, 700, batch=2, kv_heads=2, group=4, pad=33),
    Case(
        "chunk1024-of-3076-streaming",
        1024,
        3076,
        2048,
        capped=False,
        batch=2,
        kv_heads=8,
        group=4,
        dim=128,
        dtype=torch.bfloat16,
        pad=100,
    ),
    Case("softcap-bf16", 2047, 2047, 512, kv_heads=4, group=2, dim=128, dtype=torch.bfloat16, softcap=30.0),
    Case("max-distance-2x", 3000, 3000, 1000, max_distance=2000, kv_heads=2, group=2, dtype=torch.bfloat16),
    Case("positions-1e6-no-globals", 3000, 3000, 1000, n_global=0, offset=1_000_003, kv_heads=2, group=2),
]
CASES = FULL_CASES if FULL else SMALL


def rotary(dim: int) -> Rotary:
    return Rotary(1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).to(DEVICE), 1.0)


def stream_positions(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions/validity of a (chunked) prefill: the last row left-padded as transformers does."""
    positions = torch.arange(case.k_len, device=DEVICE).repeat(case.batch, 1)
    valid = torch.ones(case.batch, case.k_len, dtype=torch.bool, device=DEVICE)
    if case.pad:
        positions[-1] = (torch.arange(case.k_len, device=DEVICE) - case.pad).clamp_min(0)
        positions[-1, : case.pad] = 1  # what generate() puts at padded slots; they are invalid anyway
        valid[-1, : case.pad] = False
    return positions + case.offset, valid


def error_ratio(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.double(), other.double()
    return ((reference - other).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(what: str, reference: torch.Tensor, other: torch.Tensor, tolerance: float) -> None:
    assert torch.isfinite(other).all(), f"{what}: non-finite values"
    if (reference.double() - other.double()).abs().max() <= 1e-5:  # e.g. dq of a single key is 0
        return
    ratio = error_ratio(reference, other)
    print(f"{what}: error ratio {ratio:.2e} (tolerance {tolerance:.1e})")
    assert ratio <= tolerance, f"{what}: error ratio {ratio:.2e} > {tolerance:.1e}"


def cache_layout(case: Case, positions_now: list[int], new_tokens: int):
    """LambdaCache's layout: n_global sink slots, then `window` slots in stream order, then the new
    tokens. Row b has seen positions_now[b] tokens; slots it has not filled yet are invalid."""
    g, w = case.n_global, case.window
    k_pos, valid = [], []
    for seen in positions_now:
        sinks = torch.arange(g)
        window = torch.arange(seen - w, seen)
        new = torch.arange(seen, seen + new_tokens)
        sink_ok = sinks < seen
        window_ok = window >= g  # tokens < g live in the sink slots
        k_pos.append(torch.cat((sinks, window.clamp_min(0), new)))
        valid.append(torch.cat((sink_ok, window_ok, torch.ones(new_tokens, dtype=torch.bool))))
    k_pos = torch.stack(k_pos).to(DEVICE)
    return k_pos[:, -new_tokens:], k_pos, torch.stack(valid).to(DEVICE)


DECODE = [
    # (case, tokens seen per row, new tokens)
    (Case("decode-gqa4", 1, 0, 32, batch=3, kv_heads=2, group=4), [5, 40, 300], 1),
    (
        Case(
            "decode-streaming-gqa8-d128-bf16", 1, 0, 24, capped=False, batch=2, group=8, dim=128, dtype=torch.bfloat16
        ),
        [30, 500],
        1,
    ),
    (Case("decode-3-tokens-fp16", 3, 0, 16, batch=2, kv_heads=2, group=2, dtype=torch.float16), [17, 90], 3),
]
DECODE_FULL = [
    (
        Case("decode-gqa4", 1, 0, 4096, batch=8, kv_heads=8, group=4, dim=128, dtype=torch.bfloat16),
        [100, 4000, 4099, 5000, 32_000, 70_000, 128_000, 9],
        1,
    ),
    (
        Case("decode-streaming-gqa8", 1, 0, 2048, capped=False, batch=4, kv_heads=2, group=8, dtype=torch.float16),
        [3, 2000, 2052, 10_000],
        1,
    ),
    (Case("decode-4-tokens-fp32", 4, 0, 1000, batch=2, kv_heads=4, group=4, dim=128), [1500, 700], 4),
]


def run_both(engine, case: Case, q, k, v, q_pos, k_pos, valid, q_valid, backward: bool, tolerance=TOLERANCE):
    """`engine` (the reference's arguments) on (q, k, v) in case.dtype, the reference on the same values
    in float32. Only real queries (q_valid) are compared, and only they carry a gradient: what a padding
    query sees is unspecified (its position breaks stream order), and a loss never reads it."""
    scaling = case.dim**-0.5
    rope = rotary(case.dim)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    leaves32 = [t.detach().float().requires_grad_(backward) for t in (q, k, v)]
    out = engine(*leaves, q_pos, k_pos, valid, case.spec, rope, scaling, softcap=case.softcap)
    ref = lambda_attention_reference(*leaves32, q_pos, k_pos, valid, case.spec, rope, scaling, softcap=case.softcap)
    assert out.shape == ref.shape and out.dtype == case.dtype
    real = q_valid[:, :, None, None]
    assert_close(f"{case.name} output", ref * real, out * real, tolerance[0][case.dtype])
    if backward:
        grad = (torch.randn_like(ref) * real).to(case.dtype)
        out.backward(grad)
        ref.backward(grad.float())
        for name, mine, theirs in zip("qkv", leaves, leaves32, strict=True):
            assert mine.grad.dtype == case.dtype
            assert_close(f"{case.name} d{name}", theirs.grad, mine.grad, tolerance[1][case.dtype])


def make_qkv(case: Case, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (case.batch, case.kv_heads, case.k_len, case.dim)
    q = torch.randn(case.batch, case.kv_heads * case.group, case.q_len, case.dim, generator=gen, device=DEVICE)
    k = torch.randn(*shape, generator=gen, device=DEVICE)
    v = torch.randn(*shape, generator=gen, device=DEVICE)
    if case.softcap is not None:
        q = q * 3.0  # scores large enough for the cap to bend them
    return q.to(case.dtype), k.to(case.dtype), v.to(case.dtype)


def run_prefill(engine, case: Case, q, k, v, backward: bool, tolerance=TOLERANCE) -> None:
    """`run_both` over the keys of a (chunked) prefill: the queries are the last q_len key slots."""
    k_pos, valid = stream_positions(case)
    q_len = case.q_len
    run_both(engine, case, q, k, v, k_pos[:, -q_len:], k_pos, valid, valid[:, -q_len:], backward, tolerance)
