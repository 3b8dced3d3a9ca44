"""`generate()` on a patched model: the method's cache and chunked prefill, through generate's own kwargs."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from .patching import PatchLog
from .recipe import Recipe


@torch.no_grad()
def _prefill_all_but_last_chunk(model: PreTrainedModel, args: tuple, kwargs: dict, chunk: int) -> bool:
    """Feed the prompt, except its last `chunk` tokens, through the cache in chunks that end where it ends.

    Chunks counted back from the end split every row of a left-padded batch at the same distances
    from its last token as the prompt alone, which methods whose result depends on the split
    (InfLLM's execution blocks) need for a ragged batch to match each prompt alone. generate() then
    prefills the last chunk in one pass. False (nothing done) when the prompt is not given as ids,
    its padding would be inferred by generate from pad tokens, or only the tokens after a cache are given.
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
    cache = kwargs["past_key_values"]
    past = cache.get_seq_length()
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() derives them
    stops = range(ids.shape[1] - chunk, past, -chunk)
    decoder = model.get_decoder()
    for start, stop in zip((past, *reversed(stops)), reversed(stops), strict=False):
        decoder(
            input_ids=ids[:, start:stop],
            attention_mask=mask[:, :stop],
            position_ids=positions[:, start:stop],
            past_key_values=cache,
            use_cache=True,
        )
    return True


def install_generate(model: PreTrainedModel, recipe: Recipe, make_cache: Callable | None, log: PatchLog) -> None:
    """Shadow `model.generate` on this instance with one that supplies the cache and prefills in chunks."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        if kwargs.get("use_cache", getattr(config, "use_cache", True)) is not False:
            if make_cache is not None and kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = make_cache()
            chunk = kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None)
            chunk = chunk or recipe.generation.prefill_chunk
            handled = kwargs.get("past_key_values") is not None and _prefill_all_but_last_chunk(
                model, args, kwargs, chunk
            )
            # What remains is at most one chunk; generate's own chunking (which older transformers
            # restarts from token 0 after a prefilled cache) must not run again.
            kwargs["prefill_chunk_size"] = None if handled else chunk
        return original(*args, **kwargs)

    log.set_instance_attr(model, "generate", generate)
