"""The models the benchmarks run, with random weights (cost depends on the shape only): the shapes of public
checkpoints (shapes.py), and tiny models of every supported family, which the tests and the quick checks of the
tools use."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LcpatchError
from .shapes import PRESETS, TINY

# tiny_model's families: (model_type, what sets the family apart at the tiny shape).
FAMILIES = {
    "llama": ("llama", {}),
    # Mistral's default 4096-token sliding window is wider than any test window: Λ applies.
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    # Partial rotary: only half of each head is rotated.
    "phi3": ("phi3", {"partial_rotary_factor": 0.5}),
    # One local (sliding, own RoPE base) and one global layer.
    "gemma3": (
        "gemma3_text",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 16,
        },
    ),
}


def preset_config(name: str):
    """The transformers config of a shape preset."""
    from transformers import AutoConfig

    settings = dict(PRESETS[name])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random model of the tiny shape (or of `overrides`) in one of FAMILIES, in eval mode. Its logits are
    peaked (initializer_range 0.15), so that greedy decoding is not decided by float noise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    special = dict(initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(model_type, **{**TINY, **special, **extra, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def load_model(name: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, description, weights in bytes) from a preset, a config.json or a model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(name).expanduser()
    if name in PRESETS:
        config = preset_config(name)
        described = f"{name} shape, random weights"
    elif path.is_file() and path.suffix == ".json":
        config = AutoConfig.from_pretrained(path)
        described = f"{path.name} ({config.model_type}), random weights"
    elif (path / "config.json").is_file():
        if layers is not None:
            raise LcpatchError(f"--layers applies to random-weight models only; {name} is a model folder with weights.")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        return model, f"{path.name} ({model.config.model_type})", _weight_bytes(model)
    else:
        raise LcpatchError(
            f"--model {name!r} is neither a preset ({', '.join(PRESETS)}), a config.json nor a folder with a "
            "config.json; give one of those."
        )
    if layers is not None:
        if not 1 <= layers <= config.num_hidden_layers:
            raise LcpatchError(f"--layers {layers}: the model has {config.num_hidden_layers} layers; give 1..that.")
        config.num_hidden_layers = layers
        described += f", first {layers} layers"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model, described, _weight_bytes(model)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
