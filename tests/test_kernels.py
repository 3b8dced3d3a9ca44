"""Λ-attention Triton kernels against the PyTorch reference (run in float32): output and dq/dk/dv.

On CPU the kernels run under TRITON_INTERPRET=1 at small sizes (the whole file stays well under
3 minutes on 2 cores). With LCPATCH_TEST_FULL=1 on a CUDA machine the same checks run compiled, at
real sizes:  LCPATCH_TEST_FULL=1 python -m pytest tests/test_kernels.py
The cases and the comparison are `lambda_cases`'s, shared with the other engines' tests.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import replace

import pytest
import torch
from kernel_mode import FULL, skip_module_unless_runnable  # first: sets TRITON_INTERPRET

pytest.importorskip("triton")

from lambda_cases import (
    CASES,
    DECODE,
    DECODE_FULL,
    Case,
    cache_layout,
    make_qkv,
    rotary,
    run_both,
    run_prefill,
    stream_positions,
)
from sm90_compile import compile_in_subprocess

from lcpatch.attention.backends import TRITON as kernels
from lcpatch.kernels.lambda_reference import lambda_attention_reference

DECODE_MAX_ROWS = importlib.import_module("lcpatch.kernels.dispatch").DECODE_MAX_ROWS

skip_module_unless_runnable(importlib.import_module("lcpatch.kernels.lambda_prefill")._lambda_fwd)


def _interpreter_bf16_dot() -> None:
    """The Triton interpreter multiplies bfloat16 operands as their uint16 storage (3.9 still does);
    widen them to float32 first, as the GPU's tensor cores do exactly."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        data = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a, b = widen(a), widen(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


if not FULL:
    _interpreter_bf16_dot()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_prefill_forward_backward(case: Case):
    run_prefill(kernels.lambda_attention, case, *make_qkv(case), backward=True)


def test_prefill_inference_layout():
    """No gradient, many rows: the forward without LSE, q/k/v as transformers lays them out."""
    case = replace(CASES[1], name="inference-transposed")
    q, k, v = make_qkv(case)
    # (B, L, H, D) memory seen as (B, H, L, D), as q_proj(x).view(...).transpose(1, 2) gives.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    with torch.no_grad():
        run_prefill(kernels.lambda_attention, case, q, k, v, backward=False)


@pytest.mark.parametrize("case,seen,new", DECODE_FULL if FULL else DECODE, ids=lambda x: getattr(x, "name", ""))
def test_decode_over_bounded_cache(case: Case, seen: list[int], new: int):
    q_pos, k_pos, valid = cache_layout(case, seen, new)
    case = replace(case, q_len=new, k_len=k_pos.shape[1])
    assert case.group * new <= DECODE_MAX_ROWS  # this goes through the split-KV kernel
    q, k, v = make_qkv(case)
    with torch.no_grad():
        run_both(kernels.lambda_attention, case, q, k, v, q_pos, k_pos, valid, valid[:, -new:], backward=False)


def test_unsupported_falls_back_with_one_warning():
    case = Case("head-dim-96", 20, 20, 8, dim=96, group=2)
    q, k, v = make_qkv(case)
    k_pos, valid = stream_positions(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = kernels.lambda_attention(q, k, v, k_pos, k_pos, valid, case.spec, rotary(96), 96**-0.5)
    assert sum("head dims" in str(w.message) for w in caught) == 1
    ref = lambda_attention_reference(q, k, v, k_pos, k_pos, valid, case.spec, rotary(96), 96**-0.5)
    torch.testing.assert_close(out, ref)


def test_prefill_forward_compiles_for_hopper_without_spilling():
    compile_in_subprocess("prefill_forward_variants()")
