"""Chunked prefill: how `generate()` on a patched model reads a long prompt through the method's cache.

The prompt, but its last chunk, is streamed through the decoder alone (no LM head: no logits), one
chunk of activations at a time; generate() then runs the last chunk itself, with `logits_to_keep=1`.
Progress of that streaming goes to a `prefill_progress(done, total)` callable passed to generate(),
or to a tqdm bar when the recipe sets `generation.progress: true`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from .._compat import CACHE_ARG

Progress = Callable[[int, int], None]


class ProgressBar:
    """`generation.progress: true`: a tqdm bar over the prompt tokens streamed in chunks, one per call."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="lcpatch prefill")
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


@torch.no_grad()
def prefill_all_but_last_chunk(
    model: PreTrainedModel,
    args: tuple,
    kwargs: dict,
    chunk: int,
    progress: Progress | None,
    keep_past_above: int | None = None,
) -> bool:
    """Feed the prompt, except its last `chunk` tokens, through the cache in chunks that end where it ends.

    Chunks counted back from the end split every row of a left-padded batch at the same distances
    from its last token as the prompt alone, which methods whose result depends on the split
    (InfLLM's execution blocks) need for a ragged batch to match each prompt alone. generate() then
    prefills the last chunk in one pass. False (nothing done) when the prompt is not given as ids,
    its padding would be inferred by generate from pad tokens, or only the tokens after a cache are given.
    `progress(done, total)` follows the tokens streamed here (all but the last chunk), after each chunk.
    With `keep_past_above` (see `Family.drops_cache_up_to`), a prompt longer than it leaves generate() a
    cache holding more than that many tokens (a shorter last chunk), or none at all.
    The chunks go through the cache's `prefill_forward` where it has one (the decoder, compiled).
    """
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not torch.is_tensor(ids) or ids.ndim != 2 or ids.is_floating_point():
        return False
    config = kwargs.get("generation_config") or model.generation_config
    mask = kwargs.get("attention_mask")
    if mask is None:
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        if pad is not None and bool((ids == pad).any()):
            return False
        mask = torch.ones_like(ids)
    elif mask.shape[1] != ids.shape[1]:  # only the new tokens were passed: generate() takes them as they are
        return False
    # generate() repeats each row for beams / returned sequences before its own prefill: so do we.
    expand = max(
        kwargs.get("num_beams", config.num_beams or 1),
        kwargs.get("num_return_sequences", config.num_return_sequences or 1),
    )
    ids, mask = ids.repeat_interleave(expand, dim=0), mask.repeat_interleave(expand, dim=0)
    cache = kwargs[CACHE_ARG]
    past = cache.get_seq_length()
    last = chunk
    if keep_past_above is not None and ids.shape[1] > keep_past_above:
        last = min(chunk, ids.shape[1] - keep_past_above - 1)
        if last < 1:
            return False
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() derives them
    stops = range(ids.shape[1] - last, past, -chunk)
    decoder = getattr(cache, "prefill_forward", None) or model.get_decoder()
    for start, stop in zip((past, *reversed(stops)), reversed(stops), strict=False):
        decoder(
            input_ids=ids[:, start:stop],
            attention_mask=mask[:, :stop],
            position_ids=positions[:, start:stop],
            use_cache=True,
            **{CACHE_ARG: cache},
        )
        if progress is not None:
            progress(stop - past, stops[0] - past)
    return True
