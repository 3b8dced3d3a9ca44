"""Route Λ attention to the decode or prefill kernel, or to the reference where the kernels do not apply."""

from __future__ import annotations

import torch

from lcpatch.attention.lambda_reference import lambda_attention_reference
from lcpatch.attention.lm_infinite import LambdaSpec
from lcpatch.attention.rotary import Rotary

from .lambda_decode import DECODE_MAX_ROWS, lambda_decode
from .lambda_prefill import lambda_prefill
from .utils import fallback_reason, warn_once


def lambda_attention(
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
    dropout: float = 0.0,
    keys_in_stream_order: bool = True,
) -> torch.Tensor:
    """Λ attention over un-rotated q/k with Triton kernels; returns (B, Lq, Hq, D) in query's dtype.

    Only the decode kernel accepts keys out of stream order (`keys_in_stream_order=False`, a ring buffer):
    it masks by positions alone, while the prefill kernel slices each query's window by slot.
    """
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    rows = query.shape[2] * (query.shape[1] // key.shape[1])
    decode = not needs_grad and rows <= DECODE_MAX_ROWS
    reason = fallback_reason(query, key, value, rotary, dropout)
    if reason is None and not (decode or keys_in_stream_order):
        reason = f"{rows} query rows per KV head over keys out of stream order (decode kernel: <= {DECODE_MAX_ROWS})"
    if reason is not None:
        warn_once(f"lcpatch.kernels: {reason} is not supported by the Triton kernels; using the PyTorch reference.")
        return lambda_attention_reference(
            query,
            key,
            value,
            query_positions,
            key_positions,
            key_valid,
            spec,
            rotary,
            scaling,
            softcap=softcap,
            dropout=dropout,
            keys_in_stream_order=keys_in_stream_order,
        )
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    run = lambda_decode if decode else lambda_prefill
    return run(query, key, value, query_positions, key_positions, key_valid, spec, rotary, scaling, softcap)


__all__ = ["lambda_attention", "lambda_decode", "lambda_prefill"]
