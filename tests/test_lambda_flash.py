"""Λ attention on flash-attention (`kernels/lambda_flash.py`) against the per-pair reference: output and
dq/dk/dv over a prefill, chunks over the bounded cache (sink slots before flash-attention's keys), and
the layouts it must refuse. On CPU the flash-attention calls are `REFERENCE_WINDOW`, a PyTorch
stand-in, and the merge kernels run under TRITON_INTERPRET=1; with LCPATCH_TEST_FULL=1 on a GPU where
flash-attn-4 imports, half precision runs the real flash-attention at real sizes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from lambda_cases import CASES, DEVICE, FULL, Case, cache_layout, make_qkv, run_both, run_prefill, stream_positions
from sm90_compile import compile_in_subprocess

from lcpatch.kernels.lambda_flash import (
    FLASH_WINDOW,
    REFERENCE_WINDOW,
    lambda_attention_flash,
    layout,
)

try:
    import flash_attn.cute  # noqa: F401

    HAS_FLASH = FULL
except ImportError:
    HAS_FLASH = False

FLASH_CASES = [case for case in CASES if case.softcap is None and not case.pad]
# float32 runs the stand-in (flash-attention has no float32): the merge is then float32 throughout.
FP32 = ({torch.float32: 5e-5}, {torch.float32: 5e-5}) if FULL else ({torch.float32: 1e-6}, {torch.float32: 1e-6})


def flash(dtype: torch.dtype):
    window_attention = FLASH_WINDOW if HAS_FLASH and dtype != torch.float32 else REFERENCE_WINDOW

    def engine(q, k, v, q_pos, k_pos, valid, spec, rotary, scaling, softcap=None):
        assert softcap is None
        keys = layout(q_pos, k_pos, valid, spec)
        assert keys.problem is None, keys.problem
        return lambda_attention_flash(q, k, v, q_pos, k_pos, valid, spec, rotary, scaling, keys, window_attention)

    return engine


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: c.name)
def test_prefill_float32(case: Case):
    case = replace(case, dtype=torch.float32)
    run_prefill(flash(case.dtype), case, *make_qkv(case), backward=True, tolerance=FP32)


@pytest.mark.parametrize("case", [c for c in FLASH_CASES if c.dtype != torch.float32], ids=lambda c: c.name)
def test_prefill_half_precision(case: Case):
    run_prefill(flash(case.dtype), case, *make_qkv(case), backward=True)


CHUNKS = [
    # (case, tokens seen before the chunk, chunk length): before, inside and past window + n_global
    (Case("chunk-first", 0, 0, 32, batch=2, kv_heads=2, group=2), 0, 50),
    (Case("chunk-seen-within-window", 0, 0, 32, kv_heads=2, group=2), 20, 30),
    (Case("chunk-seen-window-plus-2", 0, 0, 32, n_global=4, group=4), 34, 40),
    (Case("chunk-after-gap-streaming", 0, 0, 32, capped=False, batch=2, group=2), 300, 33),
]
CHUNKS_FULL = [
    (Case("chunk-first", 0, 0, 4096, kv_heads=8, group=4, dim=128, dtype=torch.bfloat16), 0, 4096),
    (Case("chunk-second", 0, 0, 4096, kv_heads=8, group=4, dim=128, dtype=torch.bfloat16), 4096, 4096),
    (Case("chunk-window-plus-2", 0, 0, 4096, n_global=4, kv_heads=8, group=4, dim=128), 4098, 1024),
    (Case("chunk-after-gap-streaming", 0, 0, 2048, capped=False, kv_heads=2, group=8, dtype=torch.float16), 9000, 777),
]


@pytest.mark.parametrize("case,seen,new", CHUNKS_FULL if FULL else CHUNKS, ids=lambda x: getattr(x, "name", ""))
def test_chunk_over_the_bounded_cache(case: Case, seen: int, new: int):
    """LambdaCache's keys for a prefill chunk: sink slots, the window (its first slots invalid copies of
    the sinks while it fills), the chunk. The sinks are then scored by the global part, near and far."""
    q_pos, k_pos, valid = cache_layout(case, [seen] * case.batch, new)
    if seen == 0:  # the first chunk: nothing stored, sink slots empty
        k_pos, valid = k_pos[:, case.window :], valid[:, case.window :]
        valid[:, : case.n_global] = False
    case = replace(case, q_len=new, k_len=k_pos.shape[1])
    keys = layout(q_pos, k_pos, valid, case.spec)
    assert keys.problem is None
    tolerance = FP32 if case.dtype == torch.float32 else None
    run_both(
        flash(case.dtype),
        case,
        *make_qkv(case),
        q_pos,
        k_pos,
        valid,
        valid[:, -new:],
        True,
        *[tolerance] * (tolerance is not None),
    )


def test_layouts_flash_attention_cannot_take():
    case = Case("pad", 20, 20, 8, batch=2, pad=3)
    k_pos, valid = stream_positions(case)
    assert "left-padded batch" in layout(k_pos, k_pos, valid, case.spec).problem
    # queries that are not the last keys
    positions = torch.arange(20, device=DEVICE)[None]
    valid = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)
    assert layout(positions[:, :5], positions, valid, case.spec).problem is not None
    # a gap inside the window: a slot holding a non-global token, then a jump
    k_pos = torch.cat((torch.arange(10), torch.arange(12, 22))).to(DEVICE)[None]
    assert layout(k_pos[:, -4:], k_pos, valid, case.spec).problem is not None
    # the same rows at different points of the stream
    q_pos, k_pos, valid = cache_layout(Case("rows", 1, 0, 8, batch=2), [3, 30], 2)
    assert layout(q_pos, k_pos, valid, LambdaSpecFor(8)).problem is not None


def LambdaSpecFor(window: int):
    return Case("spec", 1, 1, window).spec


def test_no_global_part_returns_the_window_attention_itself():
    """Queries that all see their globals inside the window: flash-attention's output, no merge."""
    case = Case("short", 12, 12, 16, kv_heads=2, group=2)
    q, k, v = make_qkv(case)
    k_pos, valid = stream_positions(case)
    keys = layout(k_pos, k_pos, valid, case.spec)
    assert keys.problem is None and keys.tail == 0
    out = lambda_attention_flash(
        q, k, v, k_pos, k_pos, valid, case.spec, *_rotary_scaling(case), keys, REFERENCE_WINDOW
    )
    assert out.shape == (1, 12, 4, 64)


def _rotary_scaling(case: Case):
    from lambda_cases import rotary

    return rotary(case.dim), case.dim**-0.5


def test_backend_flash_where_it_cannot_run_names_the_install():
    from lcpatch.attention.backends import TORCH, select_backend
    from lcpatch.errors import BackendError

    with pytest.raises(BackendError, match=r"backend is 'flash' but .*pip install \"lcpatch\[flash\]\" \(flash-attn-4"):
        select_backend("flash", torch.device("cpu"))
    assert select_backend("auto", torch.device("cpu")) is TORCH


def test_recipe_takes_backend_flash():
    import lcpatch

    recipe = lcpatch.Recipe.from_dict({"attention": {"method": "lm-infinite", "backend": "flash"}})
    assert recipe.attention.backend == "flash"


@pytest.mark.parametrize("kernel", ["_score_fwd", "_merge_fwd", "_merge_bwd"])
def test_merge_kernels_compile_for_hopper(kernel: str):
    """Every variant the GPU takes compiles for sm_90 (the interpreter does not check Triton's typing), without
    spilling registers."""
    compile_in_subprocess(f"merge_variants({kernel!r})")
