"""Helpers shared by the Λ kernels and their launchers."""

from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

_WARNED: set[str] = set()

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, small blocks keep the interpreter fast)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fallback_reason(query, key, value, rotary, dropout: float) -> str | None:
    """Why the Λ kernels (which the InfLLM path runs on too) cannot take these tensors; None if they can."""
    dim = query.shape[-1]
    if dim not in HEAD_DIMS or key.shape[-1] != dim or value.shape[-1] != dim:
        return f"head dims q/k/v {dim}/{key.shape[-1]}/{value.shape[-1]} (kernels: {HEAD_DIMS}, all equal)"
    if rotary.dim != dim:
        return f"partial rotary ({rotary.dim} of {dim} dims rotated)"
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes q/k/v {query.dtype}/{key.dtype}/{value.dtype} (kernels: one of fp16, bf16, fp32)"
    if dropout > 0.0:
        return f"attention dropout {dropout}"
    if query.device.type != "cuda" and not interpreting():
        return f"tensors on {query.device.type} (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return None


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


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
