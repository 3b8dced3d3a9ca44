"""Perplexity by position: how well a model predicts each stretch of one long text.

The text is streamed through the model chunk by chunk, the returned cache passed back each time,
as a long prompt would be: for an unpatched model this is transformers' exact DynamicCache, for a
patched one its bounded cache. Logits are computed a slice of rows at a time from the decoder's
hidden states, so memory never holds n × vocab logits.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .._compat import CACHE_ARG
from ..errors import LcpatchError
from ..models.structure import unwrap

LOGIT_ROWS = 1024


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LcpatchError(f"{name} must be a positive integer; got {value!r}.")


def _as_ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() < 2 or ids.dtype.is_floating_point:
        raise LcpatchError(
            f"input_ids must be one sequence of at least 2 token ids, shape (n,) or (1, n); "
            f"got shape {tuple(ids.shape)} of {ids.dtype}."
        )
    return ids.long()


def token_nll(model, input_ids, chunk: int = 4096, progress: bool = True, desc: str = "perplexity") -> torch.Tensor:
    """NLL (fp32, nats, on CPU) of tokens 1..n-1 of one sequence, each predicted from all tokens before it.

    Element t-1 is the NLL of token t. The model is run in eval mode without gradients.
    """
    _check_positive("chunk", chunk)
    ids = _as_ids(input_ids)
    base = unwrap(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)  # Gemma-style, part of the logits
    ids = ids.to(base.device)
    n = ids.numel()
    nll = torch.empty(n - 1, dtype=torch.float32)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad(), tqdm(total=n, desc=desc, unit="tok", disable=not progress) as bar:
            cache = None
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                out = decoder(input_ids=ids[None, start:stop], use_cache=True, **{CACHE_ARG: cache})
                cache = getattr(out, CACHE_ARG)
                # Position i predicts token i + 1, so the chunk's last row predicts the next chunk's first token.
                hidden = out.last_hidden_state[0, : min(stop, n - 1) - start]
                for row in range(0, hidden.shape[0], LOGIT_ROWS):
                    logits = head(hidden[row : row + LOGIT_ROWS]).float()
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    first = start + row + 1
                    targets = ids[first : first + logits.shape[0]]
                    nll[first - 1 : first - 1 + logits.shape[0]] = torch.nn.functional.cross_entropy(
                        logits, targets, reduction="none"
                    ).cpu()
                bar.update(stop - start)
    finally:
        base.train(was_training)
    return nll


def _summary(values: torch.Tensor) -> dict:
    mean = float(values.double().mean())
    return {"tokens": values.numel(), "nll": mean, "ppl": math.exp(mean)}


def bucket_perplexity(nll: torch.Tensor, bucket: int = 2048) -> dict:
    """Group per-token NLL (element t-1 = token t) into buckets of token positions [start, end).

    Token 0 has no prediction, so the first bucket counts one token fewer than `bucket`.
    """
    _check_positive("bucket", bucket)
    n = nll.numel() + 1
    buckets = []
    for start in range(0, n, bucket):
        end = min(n, start + bucket)
        values = nll[max(start, 1) - 1 : end - 1]
        if values.numel():
            buckets.append({"start": start, "end": end, **_summary(values)})
    return {"buckets": buckets, "overall": _summary(nll)}


def perplexity_up_to(result: dict, end: int) -> float:
    """Perplexity of the tokens in the buckets of a `perplexity_by_position` result that end at or before `end`."""
    buckets = [b for b in result["buckets"] if b["end"] <= end]
    if not buckets:
        raise LcpatchError(f"no bucket ends at or before token {end}; the first ends at {result['buckets'][0]['end']}.")
    return math.exp(sum(b["nll"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets))


def perplexity_by_position(
    model, input_ids, bucket: int = 2048, chunk: int = 4096, progress: bool = True, desc: str = "perplexity"
) -> dict:
    """Per-bucket {start, end, tokens, nll, ppl} and overall {tokens, nll, ppl} of one long sequence.

    `chunk` tokens go through the model per forward pass, the cache carried between them.
    """
    _check_positive("bucket", bucket)
    return bucket_perplexity(token_nll(model, input_ids, chunk=chunk, progress=progress, desc=desc), bucket)
