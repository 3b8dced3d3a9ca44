"""One softmax over two key sets: many keys through PyTorch's SDPA, a few scored by hand, merged exactly.

Λ attention and InfLLM's execution blocks both split that way: the pairs inside a local window are an
ordinary attention over a contiguous run of keys (SDPA's fused kernel, any device, forward and
backward), the rest (global tokens, memory blocks) are few keys rotated at other positions.

SDPA returns no log-sum-exp, so the hand-scored part enters it as one *virtual key* (column 0 of the
keys): score m (carried by an extra query channel that only the virtual key reads) and value e_Dv (an
extra value channel that only it fills). SDPA's extra output channel is then the weight the virtual
key received, c = e^m / (Z_sdpa + e^m), and its other channels A = N_sdpa / (Z_sdpa + e^m). With the
hand-scored sums taken relative to the same m (n = N_far e^-m, z = Z_far e^-m):

    output = (A + c n) / (1 - c + c z),        log-sum-exp of all = m + log(1 - c + c z) - log(c)

an identity for any constant m, so m is detached and autograd through SDPA gives exact gradients. An m
near the log-sum-exp of the hand-scored part keeps every term near 1. Scaling is applied to the query
beforehand so that SDPA reads m unrounded by any scale; m itself is rounded to the keys' dtype first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The virtual key's score where nothing is scored by hand: exp() of it is 0 in every float format.
ABSENT = -30000.0


def head_width(dim: int, value_dim: int, device: torch.device) -> int:
    """Channels of SDPA's queries, keys and values: one past both head dims, for the virtual key."""
    width = max(dim, value_dim) + 1
    if device.type != "cpu":  # CUDA's fused SDPA kernels take multiples of 8 (else: the unfused math path)
        width = -(-width // 8) * 8
    return width


def with_virtual_key(keys: torch.Tensor, values: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated keys (B, H, N, Dk) and values (B, H, N, Dv) as SDPA reads them: (B, H, 1 + N, width) each,
    column 0 the virtual key."""
    batch, heads, n, dim = keys.shape
    value_dim = values.shape[-1]
    padded_keys = keys.new_zeros(batch, heads, 1 + n, width)
    padded_keys[:, :, 0, -1] = 1
    padded_keys[:, :, 1:, :dim] = keys
    padded_values = values.new_zeros(batch, heads, 1 + n, width)
    padded_values[:, :, 0, value_dim] = 1
    padded_values[:, :, 1:, :value_dim] = values
    return padded_keys, padded_values


def grouped_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """query (B, Hq, C, D) @ keys (B, Hkv, N, D) for every query head of each KV head's group: (B, Hq, C, N)."""
    return (query.unflatten(1, (keys.shape[1], -1)) @ keys[:, :, None].transpose(-1, -2)).flatten(1, 2)


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    far_scores: torch.Tensor,
    far_values: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over SDPA's visible keys and the hand-scored ones together.

    query (B, Hq, C, Dk): fp32, rotated and scaled. keys, values: from `with_virtual_key`, in the dtype
    SDPA runs in. mask (B, C, 1 + N): which of them each query sees (column 0 is set here).
    far_scores (B, Hq, C, F): fp32, scaled, -inf where not visible; far_values (B, Hkv, F, Dv).
    shift (B, Hq, C): detached, a value near the log-sum-exp of the far scores (-inf: none visible).
    Returns the output (B, Hq, C, Dv) and the log-sum-exp of every visible score (B, Hq, C), both fp32;
    a query that sees nothing gets 0 (and a log-sum-exp of no meaning).
    """
    dtype, width, kv_heads = keys.dtype, keys.shape[-1], keys.shape[1]
    value_dim = far_values.shape[-1]
    shift = torch.where(torch.isfinite(shift), shift, ABSENT).to(dtype).float()
    weights = torch.exp(far_scores - shift[..., None])
    far_out = (weights.unflatten(1, (kv_heads, -1)) @ far_values.float()[:, :, None]).flatten(1, 2)
    far_sum = weights.sum(dim=-1)

    q_in = torch.cat((F.pad(query, (0, width - 1 - query.shape[-1])), shift[..., None]), dim=-1).to(dtype)
    mask[:, :, 0] = True  # the virtual key: its score says whether it counts
    attended = F.scaled_dot_product_attention(q_in, keys, values, attn_mask=mask[:, None], scale=1.0, enable_gqa=True)
    a, c = attended[..., :value_dim].float(), attended[..., value_dim].float()
    denominator = 1 - c + c * far_sum
    # 0 only where a query sees no key at all (padding): SDPA gave the virtual key all the weight; output 0.
    denominator = torch.where(denominator > 0, denominator, 1.0)
    return (a + c[..., None] * far_out) / denominator[..., None], shift + torch.log(denominator) - torch.log(c)
