"""Property-based checks of the recipe schema: any input either loads and round-trips, or fails with RecipeError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcpatch import Recipe, RecipeError, load_recipe

# Random caps above random windows are warned about (tests/test_bad_inputs.py checks the warning).
pytestmark = pytest.mark.filterwarnings("ignore::lcpatch.errors.RecipeWarning")

values = st.one_of(
    st.integers(-10, 10_000),
    st.booleans(),
    st.floats(allow_nan=False, width=32),
    st.none(),
    st.sampled_from(["auto", "torch", "triton", "lm-infinite", "streaming-llm", "dense", "big", ""]),
    st.lists(st.integers(), max_size=2),
)
attention = st.dictionaries(
    st.sampled_from(["method", "n_global", "window", "max_distance", "backend", "windw", "topk"]), values, max_size=5
)
generation = st.dictionaries(st.sampled_from(["prefill_chunk", "chunk"]), values, max_size=2)
recipes = st.fixed_dictionaries(
    {}, optional={"attention": attention, "generation": generation, "name": values, "extra": values}
)


@settings(max_examples=300, deadline=None)
@given(recipes)
def test_any_dict_loads_and_round_trips_or_raises_recipe_error(data):
    try:
        recipe = load_recipe(data)
    except RecipeError as exc:
        assert str(exc)
        return
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 100_000), n_global=st.integers(0, 64), training=st.integers(2, 100_000))
def test_resolution_fills_every_auto(window, n_global, training):
    for method in ("lm-infinite", "streaming-llm"):
        recipe = load_recipe({"attention": {"method": method, "n_global": n_global}}).resolve(training)
        fields = recipe.to_dict()["attention"]
        assert isinstance(fields["window"], int) and fields["window"] >= 1
    explicit = load_recipe({"attention": {"method": "lm-infinite", "window": window}}).resolve(training)
    assert explicit.attention.max_distance == window
