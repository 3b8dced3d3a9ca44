"""Bad inputs to the library's functions: each an lcpatch error (or, for a recipe that runs but is likely not meant,
a RecipeWarning) naming the value and the fix, before any long work."""

from __future__ import annotations

import warnings

import pytest
import torch

import lcpatch
from lcpatch import RecipeError, SequenceLimitError, UnsupportedModelError
from lcpatch.errors import RecipeWarning

from tiny_models import tiny_model, tiny_tokenizer


def test_yaml_syntax_error_puts_place_problem_and_fix_on_their_own_lines(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("attention: {method: lm-infinite\n  window: [")
    with pytest.raises(RecipeError) as info:
        lcpatch.load_recipe(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"recipe {path} is not valid YAML:"
    assert lines[1] == "  line 2, column 9: expected ',' or '}', but got ':'"
    assert lines[2].strip() == "window: ["
    assert lines[3].strip() == "^" and lines[3].index("^") == lines[2].index(":")  # under the bad character
    assert lines[4] == "  (while parsing a flow mapping at line 1, column 12)"
    assert lines[5].startswith("Fix the YAML at that place") and "lcpatch.load_recipe('lm-infinite')" in lines[5]
    assert "<unicode string>" not in str(info.value)


def test_yaml_reader_error_names_the_file(tmp_path):
    path = tmp_path / "control.yaml"
    path.write_text("attention: \x07")
    with pytest.raises(RecipeError) as info:
        lcpatch.load_recipe(path)
    assert "unacceptable character #x0007" in str(info.value) and f"in {path}, position 11" in str(info.value)


NOT_MODELS = [
    (lambda x: lcpatch.remove(x), "lcpatch.remove(model) takes a model patched with lcpatch.apply"),
    (lambda x: lcpatch.describe(x), "lcpatch.describe(model) takes a transformers causal LM"),
    (lambda x: lcpatch.make_cache(x), "lcpatch.make_cache(model) takes a model patched with lcpatch.apply"),
    (lambda x: lcpatch.patched(x, "lm-infinite").__enter__(), "lcpatch.patched(model, recipe) takes a transformers"),
    (lambda x: lcpatch.apply(x, "lm-infinite"), "lcpatch.apply(model, recipe) takes a transformers causal LM"),
]


@pytest.mark.parametrize("call, expected", NOT_MODELS)
@pytest.mark.parametrize(
    "thing, shown",
    [
        (42, "got 42."),
        (
            "meta-llama/Llama-3.1-8B",
            "got 'meta-llama/Llama-3.1-8B'; load it first, e.g. AutoModelForCausalLM.from_pretrained(name).",
        ),
        (torch.nn.Linear(2, 2), "got a Linear."),
    ],
)
def test_functions_taking_a_model_name_themselves_and_what_they_got(call, expected, thing, shown):
    with pytest.raises(UnsupportedModelError) as info:
        call(thing)
    assert str(info.value).startswith(expected) and str(info.value).endswith(shown)


def test_a_tokenizer_passed_for_the_model_is_named():
    with pytest.raises(UnsupportedModelError) as info:
        lcpatch.remove(tiny_tokenizer())
    message = str(info.value)
    assert "lcpatch.apply(" not in message
    assert f"got a {type(tiny_tokenizer()).__name__}; pass the model, not its tokenizer." in message


def test_make_cache_on_a_model_without_its_own_cache_says_what_it_is():
    model = tiny_model()
    with pytest.raises(lcpatch.LcpatchError, match="this LlamaForCausalLM is not patched by lcpatch"):
        lcpatch.make_cache(model)
    lcpatch.apply(model, "dense")
    with pytest.raises(lcpatch.LcpatchError, match="is patched with dense, so it uses transformers' own caches"):
        lcpatch.make_cache(model)


@pytest.mark.parametrize("recipe", ["lm-infinite", "infllm", "dense"])
def test_generate_on_an_empty_prompt(recipe):
    model = tiny_model()
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="reshape"):  # transformers' own failure, left as it is unpatched
        model.generate(empty, max_new_tokens=2)
    lcpatch.apply(model, recipe)
    with pytest.raises(SequenceLimitError) as info:
        model.generate(input_ids=empty, attention_mask=torch.ones_like(empty), max_new_tokens=2)
    assert f"patched with {recipe} got an empty prompt: input_ids of shape (1, 0) has no token" in str(info.value)
    assert "tokenizer.bos_token_id" in str(info.value)
    with pytest.raises(SequenceLimitError, match=r"inputs_embeds of shape \(2, 0, 64\)"):
        model.generate(inputs_embeds=torch.zeros(2, 0, 64), max_new_tokens=2)
    assert model.generate(max_new_tokens=2, do_sample=False).shape == (1, 3)  # no prompt: from bos_token_id


def _recipe_warnings(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]


def test_a_distance_cap_above_the_window_warns_what_it_means():
    recipe = {"attention": {"method": "lm-infinite", "window": 100, "max_distance": 5000}}
    assert _recipe_warnings(lambda: lcpatch.load_recipe(recipe)) == [
        "attention.max_distance (5000) is above attention.window (100): the global tokens outside the window are "
        "rotated as if 5000 tokens away, farther than any pair inside the window (at most 99 apart), so distances "
        "100 to 4999 are never used. LM-Infinite caps far pairs at the window (max_distance: auto); keep a larger "
        "cap only if that gap is meant."
    ]
    for quiet in ({"window": 100, "max_distance": 100}, {"window": 100}, {"max_distance": 100}):
        assert (
            _recipe_warnings(lambda q=quiet: lcpatch.load_recipe({"attention": {"method": "lm-infinite", **q}})) == []
        )


def test_a_distance_cap_above_the_pretraining_length_warns_at_apply():
    # Trained at 64: a cap of 100 above a window of 32 (one warning each), then a window of 80 with its cap.
    capped = {"attention": {"method": "lm-infinite", "window": 32, "max_distance": 100}}
    messages = _recipe_warnings(lambda: lcpatch.apply(tiny_model(), capped))
    assert len(messages) == 2 and messages[0].startswith("attention.max_distance (100) is above attention.window (32)")
    assert messages[1] == (
        "attention.max_distance (100) is above the model's pretraining length (64): pairs are rotated at distances "
        "up to 100, which the model never saw in pretraining and which LM-Infinite's cap exists to avoid. Use "
        "window: auto and max_distance: auto (both the pretraining length), or values <= 64."
    )
    wide = {"attention": {"method": "lm-infinite", "window": 80}}
    (message,) = _recipe_warnings(lambda: lcpatch.apply(tiny_model(), wide))
    assert message.startswith("attention.window (80) and max_distance (80) are above the model's pretraining length")
    # Auto (the paper's setting) and explicit values within the training length stay quiet.
    assert _recipe_warnings(lambda: lcpatch.apply(tiny_model(), "lm-infinite")) == []
    within = {"attention": {"method": "lm-infinite", "window": 32, "max_distance": 64}}
    assert len(_recipe_warnings(lambda: lcpatch.apply(tiny_model(), within))) == 1  # only the gap above the window


def test_from_pretrained_of_a_missing_folder(tmp_path):
    with pytest.raises(RecipeError, match=r"from_pretrained\('.*nowhere'\) needs a folder .* there is no such folder"):
        lcpatch.from_pretrained(tmp_path / "nowhere")
