"""Recipe schema (YAML round trip, auto resolution) and the errors users see for bad input."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import lcpatch
from lcpatch import (
    BackendError,
    CacheError,
    PatchStateError,
    Recipe,
    RecipeError,
    UnsupportedModelError,
    UnsupportedVersionError,
)

from tiny_models import random_ids, tiny_model


def test_builtin_recipes_load_and_round_trip_yaml(tmp_path):
    assert {"lm-infinite", "streaming-llm", "dense"} <= set(lcpatch.builtin_recipes())
    for name in lcpatch.builtin_recipes():
        recipe = lcpatch.load_recipe(name)
        assert Recipe.from_yaml(recipe.to_yaml()) == recipe
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe.to_yaml())
        assert lcpatch.load_recipe(path) == recipe == lcpatch.load_recipe(str(path))
        assert lcpatch.load_recipe(recipe.to_dict()) == recipe


def test_dict_and_recipe_forms_are_equivalent():
    from lcpatch.attention import LMInfinite

    as_dict = {"attention": {"method": "lm-infinite", "n_global": 4, "window": 32}}
    as_recipe = Recipe(attention=LMInfinite(n_global=4, window=32))
    assert lcpatch.load_recipe(as_dict) == as_recipe


def test_auto_values_resolve_from_the_model_config():
    model = tiny_model(max_position_embeddings=48)
    lcpatch.apply(model, "lm-infinite")
    text = lcpatch.describe(model)
    assert "window: 48" in text and "max_distance: 48" in text and "per layer: 58" in text
    lcpatch.remove(model)
    lcpatch.apply(model, "streaming-llm")
    assert "window: 44" in lcpatch.describe(model)  # 48 - 4 sinks: positions stay in the trained range


def test_llama3_style_rope_uses_original_training_length():
    model = tiny_model(
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    lcpatch.apply(model, "lm-infinite")
    assert "window: 32" in lcpatch.describe(model)


def test_supported_models_table_lists_the_six_families():
    table = lcpatch.supported_models()
    assert [row["family"] for row in table] == ["Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "Gemma3"]
    assert all("lm-infinite" in row["methods"] for row in table)
    assert "| Gemma3 |" in str(table)


def test_print_model_shows_the_patch():
    model = tiny_model()
    lcpatch.apply(model, {"attention": {"method": "lm-infinite", "n_global": 2, "window": 8}})
    assert "lcpatch=lm-infinite(n_global=2, window=8, max_distance=8" in repr(model)


BAD_RECIPES = [
    ("no-such-recipe", "unknown recipe 'no-such-recipe'", "lm-infinite"),
    ({"attention": {"method": "lm-infinite", "windw": 8}}, "attention.windw", "window"),
    ({"attention": {"method": "lm-infinite", "window": "big"}}, "'big'", "integer >= 1 or 'auto'"),
    ({"attention": {"method": "lm-infinite", "window": 0}}, "attention.window", "integer >= 1"),
    ({"attention": {"method": "lm-infinite", "window": -5}}, "-5", "integer >= 1"),
    ({"attention": {"method": "lm-infinite", "n_global": -1}}, "attention.n_global", "integer >= 0"),
    ({"attention": {"method": "lm-infinite", "n_global": True}}, "True", "integer >= 0"),
    (
        {"attention": {"method": "lm-infinite", "window": 16, "max_distance": 8}},
        "max_distance (8)",
        ">= attention.window (16)",
    ),
    ({"attention": {"method": "flash-magic"}}, "'flash-magic'", "lm-infinite"),
    ({"attention": {"method": "lm-infinite", "backend": "cuda"}}, "'cuda'", "auto, torch, triton"),
    ({"generation": {"prefill_chunk": 0}}, "generation.prefill_chunk", "integer >= 1"),
    ({"attnetion": {}}, "recipe.attnetion", "attention"),
    ({"attention": ["lm-infinite"]}, "['lm-infinite']", "mapping"),
    ({"attention": {"method": "streaming-llm", "max_distance": 8}}, "max_distance is 8", "lm-infinite"),
    ({"attention": {"method": "streaming-llm", "distance_cap": 8}}, "attention.distance_cap", "n_global"),
    (42, "int", "built-in name"),
]


@pytest.mark.parametrize("recipe, names, accepted", BAD_RECIPES)
def test_bad_recipes_raise_recipe_errors_naming_value_and_fix(recipe, names, accepted):
    with pytest.raises(RecipeError) as info:
        lcpatch.load_recipe(recipe)
    assert names in str(info.value) and accepted in str(info.value)


def test_recipe_file_that_is_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("attention: {method: lm-infinite\n  window: [")
    with pytest.raises(RecipeError, match="not valid YAML"):
        lcpatch.apply(tiny_model(), path)
    path.write_text("just a string")
    with pytest.raises(RecipeError, match="YAML mapping"):
        lcpatch.load_recipe(path)


def test_unsupported_family_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as info:
        lcpatch.apply(model, "lm-infinite")
    assert "'gpt2'" in str(info.value) and "Llama" in str(info.value) and "Gemma3" in str(info.value)
    assert "extra_repr" not in model.__dict__


@pytest.mark.parametrize("thing", [torch.nn.Linear(2, 2), "meta-llama/Llama-3.1-8B", None])
def test_non_causal_lm_objects_are_rejected(thing):
    with pytest.raises(UnsupportedModelError, match="causal LM"):
        lcpatch.apply(thing, "lm-infinite")


def test_apply_twice_and_remove_unpatched():
    model = tiny_model()
    with pytest.raises(PatchStateError, match="not patched"):
        lcpatch.remove(model)
    lcpatch.apply(model, "lm-infinite")
    with pytest.raises(PatchStateError, match="already patched with recipe 'lm-infinite'.*remove"):
        lcpatch.apply(model, "streaming-llm")
    lcpatch.remove(model)
    with pytest.raises(PatchStateError):
        lcpatch.remove(model)


def test_forced_triton_backend_on_cpu_fails_at_apply_and_leaves_model_unchanged():
    model = tiny_model()
    with pytest.raises(BackendError, match="backend is 'triton'.*backend: auto"):
        lcpatch.apply(model, {"attention": {"method": "lm-infinite", "backend": "triton"}})
    assert model.config._attn_implementation != "lcpatch"
    lcpatch.apply(model, "lm-infinite")  # nothing was left half-applied


def test_foreign_cache_is_refused_with_the_fix():
    from transformers import DynamicCache

    model = tiny_model()
    lcpatch.apply(model, "lm-infinite")
    with pytest.raises(CacheError, match="DynamicCache.*make_cache"):
        model(random_ids(8), past_key_values=DynamicCache())


def test_transformers_version_outside_the_range(monkeypatch):
    from lcpatch._compat import check_version

    for version in ("4.57.1", "6.0.0", "nonsense"):
        with pytest.raises(UnsupportedVersionError, match=r"transformers"):
            check_version("transformers", version)
    check_version("transformers", "5.17.0")
    check_version("torch", "2.13.0+cpu")
    with pytest.raises(UnsupportedVersionError, match=r"torch 2\.5\.1 is installed.*pip install \"torch>=2\.6,<3\""):
        check_version("torch", "2.5.1")
    # transformers swaps its lazy module in sys.modules as submodules load: patch the live one.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.0")
    with pytest.raises(UnsupportedVersionError, match=r"4\.46\.0.*pip install"):
        importlib.reload(lcpatch)
    monkeypatch.undo()
    importlib.reload(lcpatch)


@pytest.mark.parametrize("package", ["trl", "peft", "accelerate"])
def test_training_stack_versions_checked_by_name(monkeypatch, package):
    from importlib import metadata

    from lcpatch._compat import check_version

    check_version(package)  # the installed one is supported
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1")
    with pytest.raises(UnsupportedVersionError, match=rf"{package} 0\.0\.1 is installed.*pip install"):
        check_version(package)

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(UnsupportedVersionError, match=rf"{package} is not installed.*lcpatch\[train\]"):
        check_version(package)
