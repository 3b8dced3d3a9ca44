"""Pure-PyTorch Λ attention: the readable spec that the Triton kernels must match.

Queries are processed in chunks so that memory stays O(chunk · (prefix + window + chunk)),
never O(n²). For each chunk the candidate keys are

- the *prefix*: key slots [0, P), P = 1 + the last slot holding a global token (j < n_global);
  their pairs are rotated at the true distance inside the window, at the method's far
  positions outside it;
- the *window slice*: slots from max(P, first query slot - window + 1) to the last query slot;
  these hold no global tokens, so only in-window (true-distance) pairs are visible there.

Key slots are laid out in stream order after the prefix, so a query's window is a contiguous
slice of slots (padding and evicted tokens only make slots invalid, never reorder them). A cache
that stores keys in another order (RingLambdaCache's ring buffer, while decoding) passes
`keys_in_stream_order=False`: then every slot is a candidate, under the full Λ rule on positions.
Such a cache may also store its window's keys already rotated at their positions (`rotated_from`):
a window key is only ever scored at its true distance, so the decode kernel then reads it as it is.
"""

from __future__ import annotations

import torch

from .specs import LambdaSpec, Rotary


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over visible entries; a query that sees nothing (padding) gets zeros rather than NaN."""
    scores = scores.masked_fill(~visible, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(scores - peak)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def rotate_slots(
    key: torch.Tensor, key_positions: torch.Tensor, rotary: Rotary, rotated_from: int | None, inverse: bool = False
) -> torch.Tensor:
    """`key` with its slots from `rotated_from` on rotated as a cache stores them (`Rotary.rotate_stored`), or
    with `inverse` rotated back; in key's dtype."""
    if rotated_from is None or rotated_from >= key.shape[2]:
        return key
    moved = rotary.rotate_stored(key[:, :, rotated_from:], key_positions[:, rotated_from:], inverse)
    return torch.cat((key[:, :, :rotated_from], moved.to(key.dtype)), dim=2)


def lambda_attention_reference(
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
    chunk_size: int = 512,
    keys_in_stream_order: bool = True,
    rotated_from: int | None = None,
) -> torch.Tensor:
    """Λ attention over un-rotated q/k.

    query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D); the queries are the last Lq key slots.
    Positions are absolute token indices (B, Lq) / (B, Lk); key_valid (B, Lk) marks real keys.
    Key slots from `rotated_from` on hold keys rotated at their positions (`Rotary.rotate_stored`),
    and none of them is a valid global token (position < n_global).
    Returns (B, Lq, Hq, D) in the query's dtype, as transformers' attention functions do.
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, group * q_len, -1)  # heads of one group share their keys
    q_pos = query_positions.repeat(1, group)
    k, v = rotate_slots(key, key_positions, rotary, rotated_from, inverse=True), value.to(torch.float32)

    if keys_in_stream_order:
        globals_ = (key_valid & (key_positions < spec.n_global)).any(dim=0)
        prefix = int(globals_.nonzero().max()) + 1 if globals_.any() else 0
    else:  # slot order says nothing: all slots are "prefix" (and no host sync, so a CUDA graph can hold this)
        prefix = k_len
    first_query_slot = k_len - q_len
    out = torch.empty(batch, kv_heads, group, q_len, value.shape[-1], dtype=torch.float32, device=q.device)

    for start in range(0, q_len, chunk_size):
        stop = min(q_len, start + chunk_size)
        rows = torch.cat([torch.arange(start, stop, device=q.device) + g * q_len for g in range(group)])
        qc, qp = q[:, :, rows], q_pos[:, rows]
        last_slot = first_query_slot + stop if keys_in_stream_order else k_len
        window_start = max(prefix, first_query_slot + start - spec.window + 1)
        pre = slice(0, min(prefix, last_slot))
        win = slice(window_start, last_slot)

        # Rotating relative to the chunk's first query keeps angles small and exact in fp32;
        # scores depend only on the difference of positions.
        origin = query_positions[:, start : start + 1]
        q_local = rotary.rotate(qc, qp - origin)
        kp_pre, kp_win = key_positions[:, pre], key_positions[:, win]

        pre_local = q_local @ rotary.rotate(k[:, :, pre], kp_pre - origin).transpose(-1, -2)
        q_far = rotary.rotate(qc, spec.far_query_position(qp))
        pre_far = q_far @ rotary.rotate(k[:, :, pre], spec.far_key_position(kp_pre)).transpose(-1, -2)
        in_window = spec.in_window(qp[:, :, None], kp_pre[:, None, :])[:, None]
        pre_scores = torch.where(in_window, pre_local, pre_far)
        win_scores = q_local @ rotary.rotate(k[:, :, win], kp_win - origin).transpose(-1, -2)

        scores = torch.cat((pre_scores, win_scores), dim=-1) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        kp = torch.cat((kp_pre, kp_win), dim=1)
        kv = torch.cat((key_valid[:, pre], key_valid[:, win]), dim=1)
        visible = (kv[:, None, :] & spec.visible(qp[:, :, None], kp[:, None, :]))[:, None]
        weights = masked_softmax(scores, visible)
        if dropout > 0.0:
            weights = torch.nn.functional.dropout(weights, p=dropout, training=True)
        values = torch.cat((v[:, :, pre], v[:, :, win]), dim=-2)
        chunk_out = weights @ values  # (B, Hkv, group * C, D)
        out[:, :, :, start:stop] = chunk_out.unflatten(2, (group, stop - start))

    return out.reshape(batch, q_heads, q_len, -1).transpose(1, 2).to(query.dtype)
