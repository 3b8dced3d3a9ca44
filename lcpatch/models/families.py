"""The table of supported families. All share transformers 5's layout (decoder.rotary_emb,
decoder.layers[i].self_attn dispatching through AttentionInterface), so an entry is only data."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    example: str  # a real checkpoint of the family, for the README table
    # The config attribute up to which the family's generate() throws a cache away: Phi-3 re-runs the whole
    # prompt (transformers < 5.20: only its last tokens, on an empty cache) when the sequence passes
    # `original_max_position_embeddings` while the cache holds no more than that, as its long RoPE starts there.
    drops_cache_up_to: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), "meta-llama/Llama-3.1-8B, HuggingFaceTB/SmolLM2-135M"),
    Family("Mistral", ("mistral",), "mistralai/Mistral-7B-v0.3"),
    Family("Qwen2", ("qwen2",), "Qwen/Qwen2.5-7B"),
    Family("Qwen3", ("qwen3",), "Qwen/Qwen3-8B"),
    Family("Phi3", ("phi3",), "microsoft/Phi-3-mini-4k-instruct", "original_max_position_embeddings"),
    Family("Gemma3", ("gemma3_text",), "google/gemma-3-1b-pt (text)"),
)


def family_of(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    accepted = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedModelError(f"lcpatch does not support model_type {model_type!r}. Supported families: {accepted}.")
