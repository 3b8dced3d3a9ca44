"""`generate()` on a patched model: the method's cache and chunked prefill, through generate's own kwargs."""

from __future__ import annotations

import functools
from collections.abc import Callable

from transformers import PreTrainedModel

from .patching import PatchLog
from .recipe import Recipe


def install_generate(model: PreTrainedModel, recipe: Recipe, make_cache: Callable | None, log: PatchLog) -> None:
    """Shadow `model.generate` on this instance with one that supplies the cache and prefill chunk size."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        if kwargs.get("use_cache", getattr(config, "use_cache", True)) is not False:
            if make_cache is not None and kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = make_cache()
            if "prefill_chunk_size" not in kwargs and getattr(config, "prefill_chunk_size", None) is None:
                kwargs["prefill_chunk_size"] = recipe.generation.prefill_chunk
        return original(*args, **kwargs)

    log.set_instance_attr(model, "generate", generate)
