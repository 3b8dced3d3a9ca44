"""An independent O(n²) Λ attention for the tests: explicit mask and explicit per-pair rotary distance.

It shares no code with lcpatch: positions come from its own rotary hook, frequencies from the
model config, and every visible (i, j) pair is scored as <R(d_ij) q_i, k_j>.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

NAME = "lcpatch_test_naive"
_STATE: dict = {}


def _inv_freq(config, layer_type: str | None, head_dim: int) -> torch.Tensor:
    rope = config.rope_parameters
    params = rope[layer_type] if layer_type in rope else rope
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by angles (..., D/2 or fewer), half-split layout, in float64."""
    rot = 2 * angles.shape[-1]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    head, tail = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = head * cos + torch.cat((-head[..., half:], head[..., :half]), -1) * sin
    return torch.cat((rotated, tail), -1)


def _naive_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    g, w, cap = _STATE["n_global"], _STATE["window"], _STATE["max_distance"]
    pos, valid = _STATE["positions"], _STATE["valid"]
    sliding = getattr(module, "sliding_window", None)
    if sliding is not None and sliding < w:
        g, w = 0, sliding
    config = module.config
    layer_type = config.layer_types[module.layer_idx] if getattr(config, "layer_types", None) else None
    inv_freq = _inv_freq(config, layer_type, query.shape[-1])

    q, k, v = query.double(), key.double(), value.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    i, j = pos[:, :, None], pos[:, None, :]
    visible = valid[:, None, :] & (j <= i) & ((j < g) | (i - j < w))
    if cap is not None:
        far = torch.full_like(i - j, cap)
    else:
        far = i.clamp(max=g + w - 1) - j
    distance = torch.where(i - j < w, i - j, far)
    scores = torch.full(visible.shape[:1] + (q.shape[1],) + visible.shape[1:], float("-inf"), dtype=torch.float64)
    for d in distance[visible].unique().tolist():
        s_d = _rotate(q, d * inv_freq) @ k.transpose(-1, -2)
        pick = (visible & (distance == d))[:, None].expand_as(s_d)
        scores[pick] = s_d[pick]
    scores = scores * scaling
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights @ v).transpose(1, 2).to(query.dtype), None


AttentionInterface.register(NAME, _naive_attention)


@contextlib.contextmanager
def naive_attention(model, name: str, state: dict):
    """Run `model` with attention implementation `name`, un-rotated q/k, and the batch's positions
    ("positions") and padding ("valid") recorded in `state` for that attention function to read."""
    decoder = model.get_decoder()

    def identity_rope(module, args, kwargs, output):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        state["positions"] = positions.expand(state["valid"].shape)
        return torch.ones_like(output[0]), torch.zeros_like(output[1])

    def record_mask(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        state["valid"] = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)

    old = decoder.config._attn_implementation
    handles = [
        decoder.rotary_emb.register_forward_hook(identity_rope, with_kwargs=True),
        decoder.register_forward_pre_hook(record_mask, with_kwargs=True),
    ]
    decoder.config._attn_implementation = name
    try:
        yield model
    finally:
        decoder.config._attn_implementation = old
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def naive_lambda(model, n_global: int, window: int, max_distance: int | None):
    """Run `model` under the naive Λ attention (max_distance None = StreamingLLM positions)."""
    _STATE.update(n_global=n_global, window=window, max_distance=max_distance)
    with naive_attention(model, NAME, _STATE):
        yield model


@torch.no_grad()
def naive_logits(model, input_ids, n_global, window, max_distance, attention_mask=None, position_ids=None):
    with naive_lambda(model, n_global, window, max_distance):
        return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
