"""Λ attention as two ordinary attentions merged by their log-sum-exp, on PyTorch's SDPA.

Every visible (i, j) pair belongs to exactly one of

- the *window part*: 0 <= i - j < window, rotated at the true distance: a sliding-window attention;
- the *global part*: j < n_global and i - j >= window, rotated at the method's far positions: a few
  keys (at most n_global per query).

Softmax over the union equals the two partial softmaxes weighted by their partition functions. The
window part, where all the work is, runs in `scaled_dot_product_attention` (any device, forward and
backward, memory O(chunk x (window + chunk)) per query chunk); the global part is a small matmul.

The merge (SDPA has no log-sum-exp output) is `sdpa_merge.attend`'s: the global part enters SDPA as
one virtual key whose weight says how to combine the two, exactly, forward and backward.

`lambda_reference.lambda_attention_reference` is the spec; this is an engine that must match it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sdpa_merge import attend, grouped_scores, head_width, with_virtual_key
from .specs import LambdaSpec, Rotary


def _window_slots(first_query_slot: int, start: int, stop: int, prefix: int, window: int):
    """Slots that can hold keys visible to queries [start, stop): the prefix and the window slice,
    as in the reference. None when [0, last) does as well: the mask goes by positions, so a gap of at
    most one chunk (what a bounded cache leaves: one evicted slot while decoding) costs less to mask
    than to gather around. Returns (slots, last)."""
    last = first_query_slot + stop
    window_start = max(prefix, first_query_slot + start - window + 1)
    prefix_stop = min(prefix, last)
    if window_start - prefix_stop <= stop - start or window_start >= last:
        return None, last
    return torch.cat((torch.arange(prefix_stop), torch.arange(window_start, last))), last


def lambda_attention_split(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    spec: LambdaSpec,
    rotary: Rotary,
    scaling: float,
    chunk_size: int = 1024,
    keys_in_stream_order: bool = True,
) -> torch.Tensor:
    """Λ attention over un-rotated q/k with the reference's arguments and result (B, Lq, Hq, D).

    No softcap and no dropout: SDPA has neither (the backend sends such calls to the reference).
    Rotations are taken in float32, relative to the first query; SDPA runs in the query's dtype.
    """
    batch, q_heads, q_len, dim = query.shape
    k_len, v_dim = key.shape[2], value.shape[-1]
    dtype, device = query.dtype, query.device
    width = head_width(dim, v_dim, device)

    if keys_in_stream_order:
        globals_ = (key_valid & (key_positions < spec.n_global)).any(dim=0)
        prefix = int(globals_.nonzero().max()) + 1 if globals_.any() else 0
    else:
        prefix = k_len
    first_query_slot = k_len - q_len
    out = torch.empty(batch, q_len, q_heads, v_dim, dtype=dtype, device=device)

    # Window part's keys as SDPA reads them, built once: column 0 the virtual key, then every slot
    # rotated at its true position relative to the first query (angles stay within window + q_len).
    origin = query_positions[:, :1]
    keys, values = with_virtual_key(rotary.rotate(key, key_positions - origin).to(dtype), value, width)
    positions, valid = F.pad(key_positions, (1, 0)), F.pad(key_valid, (1, 0))

    # The global part's keys, rotated at their far positions, and where they may be: the prefix slots.
    g_pos, g_value = key_positions[:, :prefix], value[:, :, :prefix]
    g_valid = key_valid[:, :prefix] & (g_pos < spec.n_global)
    g_key_far = rotary.rotate(key[:, :, :prefix], spec.far_key_position(g_pos))

    for start in range(0, q_len, chunk_size):
        stop = min(q_len, start + chunk_size)
        qc, qp = query[:, :, start:stop], query_positions[:, start:stop]
        if keys_in_stream_order:
            slots, last = _window_slots(first_query_slot, start, stop, prefix, spec.window)
        else:  # slot order says nothing: every slot is a candidate
            slots, last = None, k_len
        if slots is None:
            k_in, v_in, kp, kv = (
                keys[:, :, : last + 1],
                values[:, :, : last + 1],
                positions[:, : last + 1],
                valid[:, : last + 1],
            )
        else:
            columns = F.pad(slots + 1, (1, 0)).to(device)
            k_in, v_in = keys.index_select(2, columns), values.index_select(2, columns)
            kp, kv = positions.index_select(1, columns), valid.index_select(1, columns)
        q_pair, k_pair = qp[:, :, None], kp[:, None, :]
        mask = kv[:, None, :] & (k_pair <= q_pair) & (k_pair > q_pair - spec.window)  # (B, C, 1 + K)

        # Global part: the few far keys, in float32.
        q_far = rotary.rotate(qc, spec.far_query_position(qp))
        g_visible = (g_valid[:, None, :] & (g_pos[:, None, :] <= q_pair - spec.window))[:, None]
        g_scores = (grouped_scores(q_far, g_key_far) * scaling).masked_fill(~g_visible, float("-inf"))
        shift = torch.logsumexp(g_scores, dim=-1).detach()

        q_local = rotary.rotate(qc, qp - origin) * scaling
        merged, _ = attend(q_local, k_in, v_in, mask, g_scores, g_value, shift)
        out[:, start:stop] = merged.transpose(1, 2).to(dtype)
    return out
