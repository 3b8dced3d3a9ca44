"""Route Λ attention to the decode kernel (a few query rows, no gradient) or the prefill kernel."""

from __future__ import annotations

import torch

from .lambda_decode import DECODE_MAX_ROWS, lambda_decode
from .lambda_prefill import lambda_prefill
from .lambda_reference import rotate_slots
from .specs import LambdaSpec, Rotary
from .utils import unit_last


def query_rows(query: torch.Tensor, key: torch.Tensor) -> int:
    """Rows of one program of the decode kernel: query heads per KV head x queries."""
    return query.shape[2] * (query.shape[1] // key.shape[1])


def takes_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `lambda_attention` runs the decode kernel on these tensors (else the prefill kernel)."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return not needs_grad and query_rows(query, key) <= DECODE_MAX_ROWS


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
    keys_in_stream_order: bool = True,
    rotated_from: int | None = None,
) -> torch.Tensor:
    """Λ attention over un-rotated q/k with the Triton kernels; returns (B, Lq, Hq, D) in query's dtype.

    Only the decode kernel takes keys out of stream order (`keys_in_stream_order=False`, a ring
    buffer): it masks by positions alone, while the prefill kernel slices each query's window by slot.
    Keys stored rotated from slot `rotated_from` on are read as they are by the decode kernel, rotated
    back for the prefill kernel.
    """
    decode = takes_decode(query, key, value)
    if not (decode or keys_in_stream_order):
        raise ValueError(
            f"{query_rows(query, key)} query rows per KV head over keys out of stream order: the decode kernel "
            f"takes at most {DECODE_MAX_ROWS}, and the prefill kernel needs keys in stream order."
        )
    query, key, value = unit_last(query, key, value)
    args = (query_positions, key_positions, key_valid, spec, rotary, scaling, softcap)
    if decode:
        return lambda_decode(query, key, value, *args, rotated_from=rotated_from)
    key = rotate_slots(key, key_positions, rotary, rotated_from, inverse=True)
    return lambda_prefill(query, key, value, *args)
