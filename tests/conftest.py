"""Fixtures shared by the test files: tiny random models of every supported family (built from configs by
tests/tiny_models.py, no downloads), their tokenizer, and a saved copy for the command-line tools."""

from __future__ import annotations

import pytest

from tiny_models import tiny_model, tiny_tokenizer

# Phi3Config keeps its training length (original_max_position_embeddings) at 4096 whatever max_position_embeddings
# says; set here, so that `auto` windows and scales resolve alike in every family.
TRAINED_AT_64 = {"phi3": {"original_max_position_embeddings": 64}}


@pytest.fixture
def make_model():
    """`make_model(family, **config_overrides)`: a fresh tiny random model (2 layers, hidden 64, trained at 64
    tokens), float32, eval mode. The caller holds the only reference (a test can check that it is freed)."""

    def make(family: str = "llama", **overrides):
        return tiny_model(family, **{**TRAINED_AT_64.get(family, {}), **overrides})

    return make


@pytest.fixture
def tokenizer():
    """The word-level tokenizer of the tiny models' vocabulary ("w3" ... "w95"), padding on the left."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding the tiny Llama and its tokenizer, as `--model` of the command-line tools reads it.
    Shared by the whole session: tests only read it."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
