"""Per-model state of a Λ-attention patch: the hooks that feed token positions to attention.

How the patch works, without copying any model forward:
1. a forward pre-hook on the decoder records the batch's padding (2-D attention mask) and gives
   the forward a `LambdaCache` when it would otherwise create transformers' DynamicCache;
2. a forward hook on the decoder's rotary embedding records the true position ids and hands the
   layers identity cos/sin, so q and k reach the cache and attention un-rotated;
3. attention itself runs through `AttentionInterface` ("lcpatch"), which rotates each (query, key)
   pair at the distance the method chooses.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from .attention import LambdaSpec
from .attention.dispatch import select_backend
from .attention.lambda_reference import lambda_attention_reference
from .cache import LambdaCache, StepInfo
from .errors import CacheError, SequenceLimitError, UnsupportedModelError
from .models import ModelStructure
from .patching import PatchLog
from .recipe import Recipe

ATTN_IMPLEMENTATION = "lcpatch"


def layer_specs(structure: ModelStructure, recipe: Recipe) -> list[LambdaSpec]:
    """One Λ rule per layer. A layer whose own sliding window is narrower than the Λ window keeps
    it, without global tokens, so that such layers (Gemma3's local ones) behave as trained."""
    spec = recipe.attention.spec()
    return [
        spec if window is None or window >= spec.window else LambdaSpec(0, window, spec.max_distance)
        for window in structure.sliding_windows
    ]


class LambdaRuntime:
    """Hooks and attention for one patched model instance."""

    def __init__(self, structure: ModelStructure, recipe: Recipe):
        self.structure = structure
        self.recipe = recipe
        self.specs = layer_specs(structure, recipe)
        self.step: StepInfo | None = None
        self._pending: tuple[torch.Tensor, int, int] | None = None
        self._cache: weakref.ref | None = None
        self._decoder_params = list(inspect.signature(structure.decoder.forward).parameters)
        device = next(structure.model.parameters()).device
        select_backend(recipe.attention.backend, device)  # a forced backend that cannot run fails at apply

    def make_cache(self) -> LambdaCache:
        return LambdaCache(self.specs)

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
        values = dict(zip(self._decoder_params, args))
        values.update(kwargs)
        tokens = values.get("input_ids")
        tokens = tokens if tokens is not None else values.get("inputs_embeds")
        batch, length = tokens.shape[:2]
        mask = values.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.ndim != 2):
            raise SequenceLimitError(
                "lcpatch's Λ attention builds its own mask and accepts only a 2-D padding attention_mask "
                f"(batch, length); got {type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}."
            )
        valid = mask[:, -length:].bool() if mask is not None else torch.ones(
            batch, length, dtype=torch.bool, device=tokens.device
        )
        cache = values.get("past_key_values")
        if cache is None:
            use_cache = values.get("use_cache")
            use_cache = module.config.use_cache if use_cache is None else use_cache
            if use_cache and not (module.training and getattr(module, "gradient_checkpointing", False)):
                cache = self.make_cache()
                args, kwargs = self._inject_cache(args, kwargs, cache)
        elif not isinstance(cache, LambdaCache):
            raise CacheError(
                f"this model is patched with {self.recipe.attention.method}, whose keys are stored un-rotated in a "
                f"bounded cache; got a {type(cache).__name__}. Pass past_key_values=None (the model makes its own), "
                "a cache returned by this model, or lcpatch.make_cache(model)."
            )
        self._pending = (valid.to(tokens.device), batch, length)
        self._cache = weakref.ref(cache) if cache is not None else None
        self.step = None
        return args, kwargs

    def _inject_cache(self, args, kwargs, cache):
        index = self._decoder_params.index("past_key_values")
        if index < len(args):
            args = (*args[:index], cache, *args[index + 1 :])
        else:
            kwargs = {**kwargs, "past_key_values": cache}
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
            step = StepInfo(positions.to(torch.long).expand(batch, length), valid)
            self.step = step
            cache = self._cache() if self._cache is not None else None
            if isinstance(cache, LambdaCache):
                cache.step = step
        cos, sin = output
        return torch.ones_like(cos), torch.zeros_like(sin)

    # -- attention -----------------------------------------------------------------------------
    def _key_metadata(self, layer: int, key: torch.Tensor, q_len: int):
        step = self.step
        cache = self._cache() if self._cache is not None else None
        if isinstance(cache, LambdaCache):
            cache_layer = cache.layers[layer]
            if cache_layer.key_step is step and cache_layer.key_positions.shape[1] == key.shape[2]:
                return cache_layer.key_positions, cache_layer.key_valid
        if key.shape[2] == q_len:
            return step.positions, step.valid
        raise CacheError(
            f"layer {layer} received {key.shape[2]} keys for {q_len} queries from a cache lcpatch does not manage; "
            "Λ attention needs the positions of every cached key. Let the patched model create its cache."
        )

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if attention_mask is not None:
            raise SequenceLimitError(
                "lcpatch's Λ attention builds its own mask; a prepared (4-D) attention mask was passed. "
                "Pass a 2-D padding mask (batch, length) instead."
            )
        step = self.step
        if step is None or step.positions.shape[1] != query.shape[2]:
            raise UnsupportedModelError(
                f"{type(module).__name__} ran without the positions recorded by lcpatch's rotary hook; "
                "the model's forward does not go through decoder.rotary_emb as expected."
            )
        layer = module.layer_idx
        key_positions, key_valid = self._key_metadata(layer, key, query.shape[2])
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        rotary = self.structure.rotaries[layer]
        spec = self.specs[layer]
        if select_backend(self.recipe.attention.backend, query.device) == "triton":
            from .kernels import lambda_attention

            out = lambda_attention(
                query, key, value, step.positions, key_positions, key_valid, spec, rotary, scaling,
                softcap=kwargs.get("softcap"), dropout=dropout,
            )
        else:
            out = lambda_attention_reference(
                query, key, value, step.positions, key_positions, key_valid, spec, rotary, scaling,
                softcap=kwargs.get("softcap"), dropout=dropout,
            )
        return out, None
