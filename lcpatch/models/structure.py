"""Find, on a loaded causal LM, the modules that lcpatch hooks, and check that they look as expected."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from .._compat import CACHE_ARG
from ..errors import UnsupportedModelError
from ..kernels.specs import Rotary
from .families import Family, family_of


@dataclass
class ModelStructure:
    model: PreTrainedModel  # the transformers causal LM (a PEFT wrapper's base model)
    family: Family
    decoder: nn.Module
    rotary_emb: nn.Module
    attentions: list[nn.Module]
    sliding_windows: list[int | None]
    rotaries: list[Rotary]
    training_length: int

    @property
    def config(self):
        return self.decoder.config


def unwrap(model: object) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper, or the model itself."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not isinstance(base, PreTrainedModel) or not isinstance(base, GenerationMixin):
        raise UnsupportedModelError(
            f"lcpatch.apply needs a transformers causal LM (AutoModelForCausalLM or a PEFT model wrapping one); "
            f"got {type(model).__name__}."
        )
    return base


def training_length(config) -> int:
    """The sequence length the model was pretrained at (before any RoPE extension)."""
    rope = getattr(config, "rope_parameters", None) or {}
    candidates = [rope] + [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []
    for params in candidates:
        if params.get("original_max_position_embeddings"):
            return int(params["original_max_position_embeddings"])
    return int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)


def _layer_rotary(rotary_emb: nn.Module, layer_type: str | None) -> Rotary:
    prefix = f"{layer_type}_" if layer_type is not None else ""
    inv_freq = getattr(rotary_emb, f"{prefix}inv_freq", None)
    scale = getattr(rotary_emb, f"{prefix}attention_scaling", 1.0)
    if not isinstance(inv_freq, torch.Tensor):
        raise UnsupportedModelError(
            f"{type(rotary_emb).__name__} has no `{prefix}inv_freq` buffer; lcpatch cannot read its RoPE frequencies."
        )
    rotary = Rotary(inv_freq.detach().clone(), float(scale))
    # The model's rotary module must agree with lcpatch's reading of it, or every distance would be wrong.
    positions = torch.arange(8, device=inv_freq.device)[None]
    probe = torch.zeros(1, 8, 1, device=inv_freq.device)
    extra = (layer_type,) if layer_type is not None else ()
    cos, sin = rotary_emb.forward(probe, positions, *extra)
    ours_cos, ours_sin = rotary.cos_sin(positions)
    if cos.shape != ours_cos.shape or not (
        torch.allclose(cos.float(), ours_cos, atol=1e-5) and torch.allclose(sin.float(), ours_sin, atol=1e-5)
    ):
        raise UnsupportedModelError(
            f"{type(rotary_emb).__name__} computes RoPE differently from the standard cos/sin layout; "
            "lcpatch cannot re-rotate its keys. Please report this model."
        )
    return rotary


def find_structure(model: object) -> ModelStructure:
    """Locate decoder, rotary embedding and attention modules; raise a clear error if any is missing."""
    base = unwrap(model)
    family = family_of(getattr(base.config, "model_type", type(base).__name__))
    decoder = base.get_decoder()
    rotary_emb = getattr(decoder, "rotary_emb", None)
    layers = getattr(decoder, "layers", None)
    if rotary_emb is None or layers is None:
        raise UnsupportedModelError(
            f"{type(base).__name__}: expected `rotary_emb` and `layers` on its decoder {type(decoder).__name__}; "
            "this transformers version lays the model out differently."
        )
    if CACHE_ARG not in inspect.signature(decoder.forward).parameters:
        raise UnsupportedModelError(
            f"{type(decoder).__name__}.forward has no `{CACHE_ARG}` argument, which transformers "
            f"{transformers.__version__} passes the KV cache as; this model's code predates or postdates it."
        )
    params = inspect.signature(rotary_emb.forward).parameters
    if "position_ids" not in params:
        raise UnsupportedModelError(
            f"{type(rotary_emb).__name__}.forward has no `position_ids` argument; unsupported transformers layout."
        )
    takes_layer_type = "layer_type" in params
    attentions, windows, rotaries = [], [], []
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        if attention is None or getattr(attention, "layer_idx", None) != index:
            raise UnsupportedModelError(
                f"layer {index} of {type(decoder).__name__} has no self_attn with layer_idx {index}."
            )
        if getattr(attention, "config", None) is not decoder.config:
            raise UnsupportedModelError(
                f"layer {index}'s attention does not read the decoder's config; its attention implementation "
                "cannot be switched for this model alone."
            )
        layer_type = None
        if takes_layer_type:
            layer_type = getattr(attention, "layer_type", None) or decoder.config.layer_types[index]
        attentions.append(attention)
        windows.append(getattr(attention, "sliding_window", None))
        rotaries.append(_layer_rotary(rotary_emb, layer_type))
    return ModelStructure(
        model=base,
        family=family,
        decoder=decoder,
        rotary_emb=rotary_emb,
        attentions=attentions,
        sliding_windows=windows,
        rotaries=rotaries,
        training_length=training_length(decoder.config),
    )
