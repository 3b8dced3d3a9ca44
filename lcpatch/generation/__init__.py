"""`generate()` on a patched model: one replacement of `generate` on the instance that runs the registered
before-generate hooks (`hooks`), supplies the method's cache, prefills the prompt in chunks (`prefill`)
and decodes through the fast path where it can (`fast_decode`, `captured_step`), all through generate's
own kwargs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from .._compat import CACHE_ARG, with_cache_argument
from ..errors import SequenceLimitError
from ..models import family_of
from ..patching import PatchLog
from .fast_decode import install_fast_decode
from .hooks import before_generate, register_before_generate
from .prefill import Progress, ProgressBar, prefill_all_but_last_chunk

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = ["install_generate", "register_before_generate"]


def install_generate(model: PreTrainedModel, recipe: Recipe, runtime, log: PatchLog) -> None:
    """Shadow `model.generate` on this instance with one that runs its before-generate hooks, supplies the
    cache (see `fast_decode`) and prefills in chunks; `runtime` is the patch's PatchRuntime, None for dense
    attention."""
    original = model.generate
    dropped_up_to = family_of(model.config.model_type).drops_cache_up_to
    keep_past_above = getattr(model.config, dropped_up_to, None) if dropped_up_to else None
    plan = install_fast_decode(
        model, recipe.generation.decode, runtime, recipe.attention.method, log, recipe.generation.compile
    )

    label = recipe.name or recipe.attention.method

    @functools.wraps(original)
    def generate(*args, prefill_progress: Progress | None = None, **kwargs):
        _refuse_empty_prompt(args, kwargs, label)
        with before_generate(model, args, kwargs):
            kwargs = with_cache_argument(kwargs)
            config = kwargs.get("generation_config") or model.generation_config
            if kwargs.get("use_cache", getattr(config, "use_cache", True)) is not False:
                if kwargs.get(CACHE_ARG) is None:
                    cache = plan.make_cache(model.device)
                    if cache is not None:
                        kwargs[CACHE_ARG] = cache
                chunk = kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None)
                chunk = chunk or recipe.generation.prefill_chunk
                progress = prefill_progress or (ProgressBar() if recipe.generation.progress else None)
                handled = kwargs.get(CACHE_ARG) is not None and prefill_all_but_last_chunk(
                    model, args, kwargs, chunk, progress, keep_past_above
                )
                # What remains is at most one chunk; generate's own chunking (which older transformers
                # restarts from token 0 after a prefilled cache) must not run again.
                kwargs["prefill_chunk_size"] = None if handled else chunk
            return original(*args, **kwargs)

    log.set_instance_attr(model, "generate", generate)


def _refuse_empty_prompt(args: tuple, kwargs: dict, label: str) -> None:
    """An lcpatch error for a prompt of zero tokens, which would otherwise fail deep in the first layer."""
    name, prompt = "inputs_embeds", kwargs.get("inputs_embeds")
    if prompt is None:
        name, prompt = "input_ids", kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if torch.is_tensor(prompt) and prompt.ndim >= 2 and prompt.shape[1] == 0:
        raise SequenceLimitError(
            f"generate() on this model patched with {label} got an empty prompt: {name} of shape "
            f"{tuple(prompt.shape)} has no token. Pass at least one token per row (e.g. the tokenizer's BOS: "
            "input_ids=torch.tensor([[tokenizer.bos_token_id]])), or leave the prompt out to start from the "
            "model's bos_token_id."
        )
