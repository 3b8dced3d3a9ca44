"""The shapes of public checkpoints the benchmarks run with random weights, and the tiny shape of the tests: plain
settings of transformers configs, importable without torch (`lcpatch bench NAME --help` lists the preset names)."""

from __future__ import annotations

# The tiny shape: a model of it runs in milliseconds on a CPU.
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_LLAMA3_ROPE = {"rope_type": "default", "rope_theta": 500000.0}
PRESETS = {
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_parameters=_LLAMA3_ROPE,
    ),
    "llama3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_parameters=_LLAMA3_ROPE,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
    ),
    "tiny": dict(model_type="llama", **TINY),
}
