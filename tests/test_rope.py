"""RoPE scaling at apply time: equal to transformers' own model built with that rope config, exact
remove, composition with Λ attention, and the errors users see for bad rope fields."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma3ForCausalLM, LlamaForCausalLM, Phi3ForCausalLM

import lcpatch
from lcpatch import Recipe, RecipeError
from lcpatch.models.structure import find_structure

from tiny_models import random_ids, tiny_model

L = 32  # the tiny models' training length
LONG = 3 * L + 5

# recipe rope section -> the rope_parameters a transformers model would be built with (theta kept)
CASES = {
    "base": ({"scaling": "base", "theta": 400000}, {"rope_type": "default", "rope_theta": 400000.0}),
    "linear": ({"scaling": "linear", "factor": 4}, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": ({"scaling": "dynamic", "factor": 4}, {"rope_type": "dynamic", "factor": 4.0}),
    "yarn": (
        {"scaling": "yarn", "target_length": 4 * L, "beta_fast": 16},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "beta_fast": 16, "beta_slow": 1.0},
    ),
    "llama3": (
        {"scaling": "llama3", "factor": 8, "high_freq_factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 2.0,
            "original_max_position_embeddings": L,
        },
    ),
    "longrope": (
        {"scaling": "longrope", "factor": 4, "short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)]},
        {
            "rope_type": "longrope",
            "factor": 4.0,
            "short_factor": [1.0] * 8,
            "long_factor": [1.0 + i for i in range(8)],
            "original_max_position_embeddings": L,
        },
    ),
}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rotary_state(module) -> dict:
    """Everything RoPE depends on in a rotary module: buffers (by identity and value) and public attributes."""
    state = {f"buffer:{k}": (id(v), v.clone()) for k, v in module._buffers.items()}
    state.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if key.startswith("buffer:"):
            assert value[0] == after[key][0] and torch.equal(value[1], after[key][1]), key
        else:
            assert after[key] is value or after[key] == value, key


def reference(model, cls, rope_parameters):
    """transformers' own model with `rope_parameters` and the same weights."""
    config = copy.deepcopy(model.config)
    config.rope_parameters = rope_parameters
    built = cls(config).eval()
    built.load_state_dict(model.state_dict())
    return built


@pytest.mark.parametrize("name", list(CASES))
def test_scaling_equals_transformers_model_with_that_config_and_remove_is_exact(name):
    rope, params = CASES[name]
    model = tiny_model(max_position_embeddings=L)
    ids = random_ids(LONG)
    original, state = logits(model, ids), rotary_state(model.model.rotary_emb)
    expected = logits(reference(model, LlamaForCausalLM, {"rope_theta": 10000.0, **params}), ids)

    lcpatch.apply(model, {"rope": rope})
    assert torch.equal(logits(model, ids), expected)
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}  # instance only
    lcpatch.remove(model)

    assert_same_state(state, rotary_state(model.model.rotary_emb))
    assert torch.equal(logits(model, ids), original)


def test_new_base_keeps_the_model_rope_type():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    params = {"rope_theta": 10000.0, "original_max_position_embeddings": L, **llama3}
    model = tiny_model(max_position_embeddings=L, rope_parameters=params)
    ids = random_ids(LONG)
    expected = logits(reference(model, LlamaForCausalLM, {**params, "rope_theta": 50000.0}), ids)
    lcpatch.apply(model, {"rope": {"scaling": "base", "theta": 50000}})
    assert torch.equal(logits(model, ids), expected)
    assert not torch.equal(expected, logits(reference(model, LlamaForCausalLM, params), ids))


def test_partial_rotary_family_scales_like_transformers():
    model = tiny_model("phi3", max_position_embeddings=L)
    ids = random_ids(LONG)
    params = {**model.config.rope_parameters, "rope_type": "linear", "factor": 4.0}
    expected = logits(reference(model, Phi3ForCausalLM, params), ids)
    with lcpatch.patched(model, {"rope": {"scaling": "linear", "factor": 4}}):
        assert torch.equal(logits(model, ids), expected)


def test_gemma3_scales_its_global_layers_only():
    model = tiny_model("gemma3", max_position_embeddings=L)
    ids = random_ids(LONG)
    params = copy.deepcopy(model.config.rope_parameters)
    params["full_attention"] = {
        "rope_theta": params["full_attention"]["rope_theta"],
        "rope_type": "linear",
        "factor": 4.0,
    }
    expected = logits(reference(model, Gemma3ForCausalLM, params), ids)
    before = find_structure(model).rotaries
    state = rotary_state(model.model.rotary_emb)
    with lcpatch.patched(model, {"rope": {"scaling": "linear", "factor": 4}}):
        assert torch.equal(logits(model, ids), expected)
        sliding, full = lcpatch.api._PATCHED[model].structure.rotaries
        assert torch.equal(sliding.inv_freq, before[0].inv_freq)
        assert torch.allclose(full.inv_freq, before[1].inv_freq / 4)
    assert_same_state(state, rotary_state(model.model.rotary_emb))


def test_auto_factor_is_target_over_training_length():
    model = tiny_model(max_position_embeddings=L)
    with lcpatch.patched(model, {"rope": {"scaling": "yarn", "target_length": 8 * L}}):
        assert lcpatch.api.patched_recipe(model).rope.factor == 8


def test_composes_with_lm_infinite():
    """Λ attention rotates keys itself: it must use the scaled tables (and their YaRN mscale)."""
    model = tiny_model(max_position_embeddings=L)
    short, long = random_ids(L), random_ids(LONG)
    yarn = {"scaling": "yarn", "factor": 4}
    with lcpatch.patched(model, {"rope": yarn}):
        dense = logits(model, short)
    with lcpatch.patched(model, {"rope": yarn, "attention": {"method": "lm-infinite", "window": 4 * L}}):
        rotary = lcpatch.api._PATCHED[model].structure.rotaries[0]
        assert rotary.scale > 1
        # Within the window LM-Infinite is exact: it must equal the dense model with the same scaling.
        torch.testing.assert_close(logits(model, short), dense, atol=1e-5, rtol=1e-5)
        out = model.generate(long, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == LONG + 4
    assert torch.equal(logits(model, short), logits(tiny_model(max_position_embeddings=L), short))


def test_failed_apply_leaves_rotary_untouched():
    model = tiny_model(max_position_embeddings=L)
    state = rotary_state(model.model.rotary_emb)
    with pytest.raises(RecipeError, match="rope.short_factor and rope.long_factor have 3 values.*8 rotary"):
        lcpatch.apply(
            model, {"rope": {"scaling": "longrope", "factor": 2, "short_factor": [1, 1, 1], "long_factor": [2, 2, 2]}}
        )
    assert_same_state(state, rotary_state(model.model.rotary_emb))
    assert lcpatch.api.patched_recipe(model) is None


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"scaling": "linear", "factor": 0}, r"rope.factor must be a number > 0 or 'auto'; got 0"),
        ({"scaling": "linear", "factor": -2.5}, r"rope.factor must be a number > 0 or 'auto'; got -2.5"),
        ({"scaling": "e2llm", "factor": 0}, r"rope.factor must be a number > 0 or 'auto'; got 0"),
        (
            {"scaling": "ntk"},
            r"unknown rope.scaling 'ntk'; accepted: none, base, linear, dynamic, yarn, llama3, longrope, e2llm",
        ),
        ({"scaling": "linear"}, r"rope.factor is 'auto'.*rope.target_length is not set"),
        (
            {"scaling": "linear", "factor": 2, "beta_fast": 3},
            r"unknown field rope.beta_fast; rope accepts: scaling, factor, target_length",
        ),
        (
            {"scaling": "e2llm", "target_length": 4096},
            r"unknown field rope.target_length; rope accepts: scaling, factor",
        ),
        ({"scaling": "yarn", "factor": 2, "beta_fast": 1, "beta_slow": 2}, r"rope.beta_fast \(1\) must be greater"),
        ({"scaling": "llama3", "factor": 2, "low_freq_factor": 4}, r"rope.high_freq_factor \(4.0\) must be greater"),
        ({"scaling": "longrope", "factor": 2}, r"rope.short_factor must be a list of numbers > 0"),
        ({"scaling": "base"}, r"rope.scaling base needs rope.theta"),
        ({"scaling": "base", "theta": 0.5}, r"rope.theta must be a number > 1; got 0.5"),
        ({"scaling": "linear", "factor": "4"}, r"rope.factor must be a number > 0 or 'auto'; got '4' \(str\)"),
    ],
)
def test_bad_rope_fields_name_value_and_accepted(rope, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"rope": rope})


def test_length_dependent_scaling_is_refused_with_lambda_attention():
    with pytest.raises(RecipeError, match="rope.scaling dynamic changes RoPE frequencies.*lm-infinite"):
        Recipe.from_dict({"rope": {"scaling": "dynamic", "factor": 2}, "attention": {"method": "lm-infinite"}})


def test_rope_sections_round_trip_yaml():
    for rope, _ in CASES.values():
        recipe = Recipe.from_dict({"rope": rope, "name": "x"})
        assert Recipe.from_yaml(recipe.to_yaml()) == recipe
        hash(recipe)


values = st.one_of(
    st.integers(-10, 100_000),
    st.booleans(),
    st.floats(allow_nan=False, width=32),
    st.none(),
    st.sampled_from(["auto", "linear", "yarn", "e2llm", "longrope", "e2llm", "causal-lm", "hf", "x"]),
    st.lists(st.floats(0.5, 4, width=32), max_size=3),
)
rope_fields = [
    "scaling",
    "factor",
    "target_length",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "low_freq_factor",
    "high_freq_factor",
    "short_factor",
    "long_factor",
    "g",
]
training_fields = ["method", "g_max", "sink_tokens", "sequence_length", "lora", "data", "trainer", "learning_rate"]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(rope_fields), values, max_size=4),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(training_fields), values, max_size=4)),
)
def test_any_rope_or_training_section_loads_and_round_trips_or_raises_recipe_error(rope, training):
    data = {"rope": rope} if training is None else {"rope": rope, "training": training}
    try:
        recipe = Recipe.from_dict(data)
    except RecipeError as exc:
        assert str(exc)
        return
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    hash(recipe)
