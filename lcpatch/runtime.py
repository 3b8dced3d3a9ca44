"""Per-model state of a patch whose attention re-rotates keys: the hooks that feed it token positions.

How the patch works, without copying any model forward:
1. a forward pre-hook on the decoder records the batch's padding (2-D attention mask) and gives
   the forward the method's cache when it would otherwise create transformers' DynamicCache;
2. a forward hook on the decoder's rotary embedding records the true position ids and hands the
   layers identity cos/sin, so q and k reach the cache and attention un-rotated;
3. attention itself runs through `AttentionInterface` ("lcpatch"), where the method (e.g.
   `LambdaAttention`) rotates each (query, key) pair at the distance it chooses.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Protocol

import torch
from transformers.cache_utils import Cache

from ._compat import CACHE_ARG, with_cache_argument
from .cache import StepAwareCache
from .errors import CacheError, SequenceLimitError, UnsupportedModelError
from .kernels.specs import StepInfo
from .models import ModelStructure
from .patching import PatchLog

ATTN_IMPLEMENTATION = "lcpatch"


class AttentionRuntime(Protocol):
    """What an attention method provides at run time (see `LambdaAttention`)."""

    cache_class: type[Cache]

    def make_cache(self) -> Cache: ...

    def cache_sizes(self) -> list[int]: ...

    def attend(self, module, query, key, value, step: StepInfo, cache, scaling: float, dropout: float, **kwargs): ...


class PatchRuntime:
    """Hooks for one patched model instance; attention is delegated to `method`."""

    def __init__(self, structure: ModelStructure, method: AttentionRuntime, method_name: str):
        self.structure = structure
        self.method = method
        self.method_name = method_name
        self.step: StepInfo | None = None
        self._pending: tuple[torch.Tensor, int, int] | None = None
        self._cache: weakref.ref | None = None
        self._decoder_params = list(inspect.signature(structure.decoder.forward).parameters)

    def make_cache(self) -> Cache:
        return self.method.make_cache()

    def install(self, log: PatchLog, registry: weakref.WeakKeyDictionary) -> None:
        decoder, rotary = self.structure.decoder, self.structure.rotary_emb
        log.set_property(decoder.config, "_attn_implementation", ATTN_IMPLEMENTATION)
        log.on_undo(decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True).remove)
        log.on_undo(decoder.register_forward_hook(self._after_decoder, always_call=True).remove)
        log.on_undo(rotary.register_forward_hook(self._after_rotary, with_kwargs=True).remove)
        for attention in self.structure.attentions:
            registry[attention] = self
            log.on_undo(lambda attention=attention: registry.pop(attention, None))

    # -- hooks -------------------------------------------------------------------------------
    def _before_decoder(self, module, args, kwargs):
        kwargs = with_cache_argument(kwargs)
        values = dict(zip(self._decoder_params, args, strict=False))
        values.update(kwargs)
        tokens = values.get("input_ids")
        tokens = tokens if tokens is not None else values.get("inputs_embeds")
        batch, length = tokens.shape[:2]
        mask = values.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.ndim != 2):
            raise SequenceLimitError(
                f"lcpatch's {self.method_name} attention builds its own mask and accepts only a 2-D padding "
                f"attention_mask (batch, length); got {type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}."
            )
        if mask is not None:
            valid = mask[:, -length:].to(device=tokens.device, dtype=torch.bool)
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        cache = values.get(CACHE_ARG)
        if cache is None:
            use_cache = values.get("use_cache")
            use_cache = module.config.use_cache if use_cache is None else use_cache
            # Gradient checkpointing re-runs layers in backward: a cache would store their keys twice.
            if use_cache and not (module.training and getattr(module, "gradient_checkpointing", False)):
                cache = self.make_cache()
                args, kwargs = self._inject_cache(args, kwargs, cache)
        elif not isinstance(cache, self.method.cache_class):
            raise CacheError(
                f"this model is patched with {self.method_name}, whose keys are stored un-rotated in its own "
                f"{self.method.cache_class.__name__}; got a {type(cache).__name__}. Pass {CACHE_ARG}=None "
                "(the model makes its own), a cache returned by this model, or lcpatch.make_cache(model)."
            )
        self._pending = (valid, batch, length)
        self._cache = weakref.ref(cache) if cache is not None else None
        self.step = None
        return args, kwargs

    def _inject_cache(self, args, kwargs, cache):
        index = self._decoder_params.index(CACHE_ARG)
        if index < len(args):
            args = (*args[:index], cache, *args[index + 1 :])
        else:
            kwargs = {**kwargs, CACHE_ARG: cache}
        return args, kwargs

    def _after_decoder(self, module, args, output):
        self._pending = None

    def _after_rotary(self, module, args, kwargs, output):
        if self._pending is None:  # called outside a decoder forward: leave it alone
            return output
        if self.step is None:
            valid, batch, length = self._pending
            positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            if positions is None or positions.shape[-1] != length:
                raise UnsupportedModelError(
                    f"{type(module).__name__} was called without position ids for the {length} input tokens; "
                    "this transformers version computes RoPE in a way lcpatch does not support."
                )
            self.step = StepInfo(positions.to(torch.long).expand(batch, length), valid)
            cache = self._current_cache()
            if isinstance(cache, StepAwareCache):
                cache.step = self.step
        cos, sin = output
        return torch.ones_like(cos), torch.zeros_like(sin)

    def _current_cache(self):
        return self._cache() if self._cache is not None else None

    # -- attention -----------------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if attention_mask is not None:
            raise SequenceLimitError(
                f"lcpatch's {self.method_name} attention builds its own mask; a prepared (4-D) attention mask "
                "was passed. Pass a 2-D padding mask (batch, length) instead."
            )
        step = self.step
        if step is None or step.positions.shape[1] != query.shape[2]:
            raise UnsupportedModelError(
                f"{type(module).__name__} ran without the positions recorded by lcpatch's rotary hook; "
                "the model's forward does not go through decoder.rotary_emb as expected."
            )
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = self.method.attend(module, query, key, value, step, self._current_cache(), scaling, dropout, **kwargs)
        return out, None
