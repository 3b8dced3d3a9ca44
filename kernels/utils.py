"""Helpers shared by the Λ kernels and their launchers."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# What the Λ kernels (which InfLLM's kernel runs on too) take: q/k/v of one of these head dims and dtypes.
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, small blocks keep the interpreter fast)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unit_last(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with a unit stride on their last dim, copied only where they lack one: the kernels
    take any other strides, but address each row's elements as consecutive."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def grid_rows(length: int, block: int, programs: int) -> tuple[int, int]:
    return (triton.cdiv(length, block), programs)


def dot_precision(dtype: torch.dtype) -> str:
    # float32 is the test dtype: keep it exact (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def tanh(x):
    # 1 - 2 / (e^2x + 1) saturates cleanly to ±1 (tl.math has no tanh on every Triton version).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
