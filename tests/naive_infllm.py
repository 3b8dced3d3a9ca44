"""An independent, naive InfLLM for the tests: one row and one query at a time, explicit sets and distances.

It shares no code with lcpatch. The model runs once over the whole sequence (no cache); the
execution blocks that lcpatch would see when the sequence is fed in `segments` (forward passes of
that many real tokens: prompt chunks, then one token per decoding step) are rebuilt here, counted
back from the end of each segment.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

from naive_lambda import _inv_freq, _rotate, naive_attention

NAME = "lcpatch_test_naive_infllm"
_STATE: dict = {}


def _execution_blocks(segments: list[int], size: int) -> list[tuple[int, int]]:
    blocks, start = [], 0
    for length in segments:
        stop = start + length
        cuts = list(range(stop, start, -size))[::-1]
        blocks += [(max(start, cut - size), cut) for cut in cuts]
        start = stop
    return blocks


def _row_attention(q, k, v, inv_freq, scaling, cfg, segments, sliding):
    """q (Hq, n, D), k/v (Hkv, n, D) of one row's real tokens (float64); returns (Hq, n, D)."""
    n_init, n_local, bs = cfg["n_init"], cfg["n_local"], cfg["block_size"]
    heads, n = q.shape[0], q.shape[1]
    group = heads // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    out = torch.zeros(heads, n, v.shape[-1], dtype=torch.float64)
    received = torch.zeros(heads, n, dtype=torch.float64)  # attention from queries of the key's own block
    representatives: list[torch.Tensor] = []  # per formed block: (Hq, D), kv heads repeated per group
    rotated = torch.stack([_rotate(q, d * inv_freq) for d in range(n_local + 1)])  # query i at distance d

    def block_of(j):
        return (j - n_init) // bs if j >= n_init else None

    for s, t in _execution_blocks(segments, cfg["exc_block_size"]):
        if sliding is None:
            formed = max(0, (s - n_local + 1 - n_init) // bs)
            while len(representatives) < formed:
                b = len(representatives)
                members = list(range(n_init + b * bs, n_init + (b + 1) * bs))
                rep = torch.zeros(heads, k.shape[-1], dtype=torch.float64)
                for h in range(0, heads, group):
                    score = received[h : h + group].sum(0)
                    ranked = sorted(members, key=lambda j: -float(score[j]))[: cfg["repr_topk"]]
                    rep[h : h + group] = k[h, ranked].mean(0)
                representatives.append(rep)
            q_far = rotated[n_local, :, s:t].sum(1)  # (Hq, D)
            scores = [float((q_far * rep).sum()) for rep in representatives]
            selected = sorted(range(formed), key=lambda b: -scores[b])[: cfg["topk"]]
        for i in range(s, t):
            if sliding is not None:
                keys = [j for j in range(i + 1) if i - j < sliding]
            else:
                keys = [
                    j
                    for j in range(i + 1)
                    if j < n_init or i - j < n_local or block_of(j) in selected or block_of(j) >= formed
                ]
            distance = torch.tensor([min(i - j, n_local) for j in keys])
            logits = (rotated[distance, :, i] * k[:, keys].transpose(0, 1)).sum(-1).T * scaling
            p = torch.softmax(logits, dim=-1)
            out[:, i] = (p[:, None, :] @ v[:, keys])[:, 0]
            for column, j in enumerate(keys):
                if sliding is None and block_of(i) is not None and block_of(i) == block_of(j):
                    received[:, j] += p[:, column]
    return out


def _naive_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cfg, valid = _STATE["cfg"], _STATE["valid"]
    config = module.config
    layer_type = config.layer_types[module.layer_idx] if getattr(config, "layer_types", None) else None
    inv_freq = _inv_freq(config, layer_type, query.shape[-1])
    sliding = getattr(module, "sliding_window", None)
    sliding = sliding if sliding is not None and sliding < cfg["n_local"] else None
    out = torch.zeros(query.shape, dtype=torch.float64)
    for row in range(query.shape[0]):
        real = valid[row].nonzero()[:, 0]
        q, k, v = (t[row][:, real].double() for t in (query, key, value))
        segments = _STATE["segments"](len(real))
        out[row][:, real] = _row_attention(q, k, v, inv_freq, scaling, cfg, segments, sliding)
    return out.transpose(1, 2).to(query.dtype), None


AttentionInterface.register(NAME, _naive_attention)


@contextlib.contextmanager
def naive_infllm(model, cfg: dict, segments=None):
    """Run `model` under the naive InfLLM; `segments(n)` gives the forward-pass lengths for n real tokens."""
    _STATE.update(cfg=cfg, segments=segments or (lambda n: [n]))
    with naive_attention(model, NAME, _STATE):
        yield model


@torch.no_grad()
def naive_infllm_logits(model, input_ids, cfg: dict, attention_mask=None, segments=None):
    """Logits of the naive InfLLM; positions are counted over real tokens (left padding)."""
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with naive_infllm(model, cfg, segments):
        return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
