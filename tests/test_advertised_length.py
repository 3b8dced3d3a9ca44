"""What a patched model advertises as its context length (config.max_position_embeddings), and that `remove` and
`save_pretrained` give back the model's own config."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import lcpatch
from lcpatch.models.structure import training_length
from lcpatch.recipe import UNBOUNDED_CONTEXT

from tiny_models import random_ids, tiny_model

# The tiny models are trained at 64 tokens.
ADVERTISED = {
    "dense": 64,
    "logo": 64,
    "e2llm": UNBOUNDED_CONTEXT,  # auto g grows with each input's length
    "infllm": UNBOUNDED_CONTEXT,
    "lm-infinite": UNBOUNDED_CONTEXT,
    "streaming-llm": UNBOUNDED_CONTEXT,
    "longpo": 4 * 64,  # YaRN x4
}

EXTRA = {
    "rope-linear-2": ({"rope": {"scaling": "linear", "factor": 2}}, 128),
    "rope-yarn-target": ({"rope": {"scaling": "yarn", "target_length": 320}}, 320),
    "rope-e2llm-3": ({"rope": {"scaling": "e2llm", "factor": 3}}, 192),
    "rope-base": ({"rope": {"scaling": "base", "theta": 40000}}, 64),
    "lm-infinite+rope-linear": (
        {"attention": {"method": "lm-infinite"}, "rope": {"scaling": "linear", "factor": 2}},
        UNBOUNDED_CONTEXT,
    ),
}

CASES = {**{name: (name, length) for name, length in ADVERTISED.items()}, **EXTRA}


def test_every_builtin_recipe_has_a_case():
    assert set(ADVERTISED) == set(lcpatch.builtin_recipes())


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("case", list(CASES))
def test_apply_advertises_and_remove_restores_the_config(case, family):
    recipe, length = CASES[case]
    model = tiny_model(family, **({"original_max_position_embeddings": 64} if family == "phi3" else {}))
    own = model.config.to_dict()
    had_original = hasattr(model.config, "original_max_position_embeddings")
    lcpatch.apply(model, recipe)
    assert model.config.max_position_embeddings == length
    assert model.model.config.max_position_embeddings == length
    if length != 64:
        # The pretraining length stays readable where transformers (and lcpatch) look for it.
        assert model.config.original_max_position_embeddings == 64
    assert training_length(model.config) == 64
    if length == UNBOUNDED_CONTEXT:
        assert "config.max_position_embeddings: 1073741824 (no limit)" in lcpatch.describe(model)
    lcpatch.remove(model)
    assert model.config.to_dict() == own
    assert hasattr(model.config, "original_max_position_embeddings") == had_original


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _generate_past_64(model) -> list[str]:
    """generate() 3 tokens after a 70-token prompt; what transformers' length check logged."""
    records = _Records()
    logger = logging.getLogger("transformers.generation.stopping_criteria")
    logger.addHandler(records)
    logging.Logger.warning_once.cache_clear()  # transformers logs this warning once per process
    try:
        model.generate(random_ids(70), max_new_tokens=3, do_sample=False)
    finally:
        logger.removeHandler(records)
    return [m for m in records.messages if "exceeded the model's predefined maximum length" in m]


@pytest.mark.parametrize("recipe", ["lm-infinite", "infllm"])
def test_long_generate_does_not_warn_about_the_predefined_maximum_length(recipe):
    model = tiny_model()
    assert _generate_past_64(model) != []  # the warning this test must not see once patched
    lcpatch.apply(model, recipe)
    assert _generate_past_64(model) == []


def test_default_max_length_is_no_longer_cut_at_the_training_length():
    model = tiny_model()
    # Without max_new_tokens, transformers generates 20 tokens, capped at config.max_position_embeddings.
    assert model.generate(random_ids(60), do_sample=False).shape[1] == 64
    lcpatch.apply(model, "lm-infinite")
    assert model.generate(random_ids(60), do_sample=False).shape[1] == 80


def test_a_second_model_sharing_the_config_resolves_from_the_training_length():
    model = tiny_model()
    lcpatch.apply(model, "lm-infinite")
    twin = type(model)(model.config)  # shares the advertised config, as a frozen reference copy does
    lcpatch.apply(twin, "lm-infinite")
    assert "window: 64" in lcpatch.describe(twin)
    lcpatch.remove(twin)
    assert model.config.max_position_embeddings == UNBOUNDED_CONTEXT  # still patched
    lcpatch.remove(model)
    assert model.config.max_position_embeddings == 64


def test_the_rotary_embedding_keeps_reading_the_models_own_length():
    # A dynamic-NTK rotary recomputes its frequencies from config.max_position_embeddings as inputs grow.
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model, reference = tiny_model(rope_parameters=dynamic), tiny_model(rope_parameters=dynamic)
    lcpatch.apply(model, "lm-infinite")
    probe, positions = torch.zeros(1, 200, 64), torch.arange(200)[None]
    ours = model.model.rotary_emb.forward(probe, positions)
    theirs = reference.model.rotary_emb.forward(probe, positions)
    for mine, own in zip(ours, theirs, strict=True):
        assert torch.equal(mine, own)


def test_save_pretrained_writes_the_models_own_config(tmp_path):
    model = tiny_model()
    lcpatch.apply(model, "lm-infinite")
    model.save_pretrained(tmp_path)
    assert model.config.max_position_embeddings == UNBOUNDED_CONTEXT  # still advertised after saving
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config.max_position_embeddings == 64
    assert not hasattr(plain.config, "original_max_position_embeddings")
    reloaded = lcpatch.from_pretrained(tmp_path)
    assert reloaded.config.max_position_embeddings == UNBOUNDED_CONTEXT
    assert "window: 64" in lcpatch.describe(reloaded)
