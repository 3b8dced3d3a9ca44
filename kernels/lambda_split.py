"""Λ attention as two ordinary attentions merged by their log-sum-exp, on PyTorch's SDPA.

Every visible (i, j) pair belongs to exactly one of

- the *window part*: 0 <= i - j < window, rotated at the true distance: a sliding-window attention;
- the *global part*: j < n_global and i - j >= window, rotated at the method's far positions: a few
  keys (at most n_global per query).

Softmax over the union equals the two partial softmaxes weighted by their partition functions. The
window part, where all the work is, runs in `scaled_dot_product_attention` (any device, forward and
backward, memory O(chunk x (window + chunk)) per query chunk); the global part is a small matmul.

SDPA returns no log-sum-exp, so the global part enters it as one *virtual key*: score m (the global
part's own log-sum-exp, carried by an extra query channel that only the virtual key reads) and value
e_D (an extra value channel that only it fills). SDPA's extra output channel is then the weight the
virtual key received, c = e^m / (Z_window + e^m), and its other channels A = N_window / (Z_window + e^m).
With the global part's sums taken relative to the same m (ng = N_global e^-m, zg = Z_global e^-m):

    output = (A + c ng) / (1 - c + c zg)

an identity for any constant m, so m is detached and autograd through SDPA gives exact gradients.
m = log Z_global keeps every term near 1 (zg = 1 in value); scaling is applied to q beforehand so
that SDPA reads m unrounded by any scale.

`lambda_reference.lambda_attention_reference` is the spec; this is an engine that must match it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .specs import LambdaSpec, Rotary

# Score of the virtual key in rows that see no global key: exp() of it is 0 in every float format.
_ABSENT = -30000.0


def _window_slots(first_query_slot: int, start: int, stop: int, prefix: int, window: int):
    """Slots that can hold keys visible to queries [start, stop): the prefix and the window slice,
    as in the reference; None when they are one slice [0, last). Returns (slots, last)."""
    last = first_query_slot + stop
    window_start = max(prefix, first_query_slot + start - window + 1)
    prefix_stop = min(prefix, last)
    if window_start <= prefix_stop or window_start >= last:  # overlapping, or no slot past the prefix
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
    kv_heads, k_len, v_dim = key.shape[1], key.shape[2], value.shape[-1]
    dtype, device = query.dtype, query.device
    group = q_heads // kv_heads
    width = max(dim, v_dim) + 1  # one channel past both: the virtual key's score and weight
    if device.type != "cpu":  # CUDA's fused SDPA kernels take head dims in multiples of 8 (else: the slow math path)
        width = -(-width // 8) * 8

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
    virtual_key = torch.zeros(batch, kv_heads, 1, width, dtype=dtype, device=device)
    virtual_key[..., -1] = 1
    virtual_value = torch.zeros(batch, kv_heads, 1, width, dtype=dtype, device=device)
    virtual_value[..., v_dim] = 1
    rotated = F.pad(rotary.rotate(key, key_positions - origin), (0, width - dim)).to(dtype)
    keys = torch.cat((virtual_key, rotated), dim=2)
    values = torch.cat((virtual_value, F.pad(value, (0, width - v_dim))), dim=2)
    positions, valid = F.pad(key_positions, (1, 0)), F.pad(key_valid, (1, 0))

    # The global part's keys, rotated at their far positions, and where they may be: the prefix slots.
    g_pos, g_value = key_positions[:, :prefix], value[:, :, :prefix].to(torch.float32)
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
        mask[:, :, 0] = True  # the virtual key: its score says whether it counts

        # Global part: the few far keys, in float32.
        if prefix:
            q_far = rotary.rotate(qc, spec.far_query_position(qp))
            g_visible = (g_valid[:, None, :] & (g_pos[:, None, :] <= q_pair - spec.window))[:, None]
            g_scores = (q_far.unflatten(1, (kv_heads, group)) @ g_key_far[:, :, None].transpose(-1, -2)).flatten(1, 2)
            g_scores = (g_scores * scaling).masked_fill(~g_visible, float("-inf"))
            lse = torch.logsumexp(g_scores, dim=-1).detach()  # (B, Hq, C)
            sees_global = torch.isfinite(lse)
        else:
            sees_global = torch.zeros(batch, q_heads, stop - start, dtype=torch.bool, device=device)
            lse = torch.zeros(batch, q_heads, stop - start, device=device)
        shift = torch.where(sees_global, lse, _ABSENT).to(dtype).float()
        if prefix:
            weights = torch.exp(g_scores - shift[..., None])
            ng = (weights.unflatten(1, (kv_heads, group)) @ g_value[:, :, None]).flatten(1, 2)
            zg = weights.sum(dim=-1)
        else:
            ng = torch.zeros(batch, q_heads, stop - start, v_dim, device=device)
            zg = torch.zeros_like(shift)

        q_local = rotary.rotate(qc, qp - origin) * scaling
        q_in = torch.cat((F.pad(q_local, (0, width - 1 - dim)), shift[..., None]), dim=-1).to(dtype)
        attended = F.scaled_dot_product_attention(q_in, k_in, v_in, attn_mask=mask[:, None], scale=1.0, enable_gqa=True)
        a, c = attended[..., :v_dim].float(), attended[..., v_dim].float()
        denominator = 1 - c + c * zg
        # 0 only in a row that sees no key at all (padding): SDPA gave the virtual key all the weight; out 0.
        merged = (a + c[..., None] * ng) / torch.where(denominator > 0, denominator, 1.0)[..., None]
        out[:, start:stop] = merged.transpose(1, 2).to(dtype)
    return out
