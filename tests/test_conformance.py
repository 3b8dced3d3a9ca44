"""Every built-in recipe, and a recipe for each section value they leave out, on every supported family:
apply -> forward -> generate -> remove, after which the model is exactly what it was (logits, parameters,
buffers, config, every module's attributes and hooks). A second test fails when lcpatch registers a
recipe, section, method or family that no case here runs."""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref

import pytest
import torch
import transformers
from packaging.version import Version

import lcpatch
from lcpatch import Recipe, RecipeError

from tiny_models import VOCAB, random_ids, tiny_model


def registered() -> dict[str, set[str]]:
    """Every name lcpatch registers, by kind: the cases below must cover each (the one place that reads the
    registries)."""
    from lcpatch.fields import ATTENTION_METHODS, ROPE_SCALINGS, TRAINING_METHODS
    from lcpatch.recipe import DECODE_MODES, SECTIONS

    table = lcpatch.supported_models()
    return {
        "built-in recipes": set(lcpatch.builtin_recipes()),
        "families": {row["family"] for row in table},
        "attention methods": set(ATTENTION_METHODS.names()),
        "rope scalings": set(ROPE_SCALINGS.names()),
        "training methods": set(TRAINING_METHODS.names()),
        "recipe sections": set(SECTIONS),
        "decode modes": set(DECODE_MODES),
    }


# The tiny models (tests/tiny_models.py) of the supported families.
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]

BUILTIN = ["dense", "e2llm", "infllm", "lm-infinite", "logo", "longpo", "streaming-llm"]

# What the built-in recipes leave out, each combined with an attention method where the two compose.
EXTRA = {
    "infllm+rope-base": {"attention": {"method": "infllm"}, "rope": {"scaling": "base", "theta": 40000}},
    # A position-interpolation fine-tune's recipe; apply ignores its training section.
    "streaming-llm+rope-linear+causal-lm": {
        "attention": {"method": "streaming-llm"},
        "rope": {"scaling": "linear", "factor": 2},
        "training": {"method": "causal-lm"},
    },
    "lm-infinite+rope-llama3": {"attention": {"method": "lm-infinite"}, "rope": {"scaling": "llama3", "factor": 2}},
    # dynamic and longrope follow each input's length: dense attention only.
    "rope-dynamic": {"rope": {"scaling": "dynamic", "factor": 2}},
    "rope-longrope": {
        "rope": {
            "scaling": "longrope",
            "factor": 2,
            "short_factor": [1.0] * 8,
            "long_factor": [1.0 + i for i in range(8)],
        }
    },
    "lm-infinite+decode-eager": {"attention": {"method": "lm-infinite"}, "generation": {"decode": "eager"}},
    # The fast decode step, run without capture, after a prompt prefilled in chunks.
    "lm-infinite+decode-static": {
        "attention": {"method": "lm-infinite"},
        "generation": {"decode": "static", "prefill_chunk": 16},
    },
    # On a CPU, graph decodes eagerly with a RuntimeWarning saying why (filtered below).
    "streaming-llm+decode-graph": {"attention": {"method": "streaming-llm"}, "generation": {"decode": "graph"}},
}

CASES = {**{name: name for name in BUILTIN}, **EXTRA}

# (case, family) pairs that lcpatch refuses at apply, with the documented error; the model must stay untouched.
REFUSED = {
    # Phi3's partial rotary gives its heads 4 frequencies; the recipe's factors are for 8.
    ("rope-longrope", "phi3"): (RecipeError, "this model has 4 rotary frequencies per head"),
}

# (case, family) pairs that transformers itself breaks before a release of lcpatch's range: (fixed in, error).
UPSTREAM_BUGS = {
    # A layer-typed rotary (Gemma3) under longrope loses `long_inv_freq` on its second long call.
    ("rope-longrope", "gemma3"): ((5, 21), UnboundLocalError),
}
TRANSFORMERS = Version(transformers.__version__).release[:2]

LENGTH = 72  # past the tiny models' training length (64), so every method and scaling changes the logits
NEW_TOKENS = 3


def changes_the_model(recipe: Recipe) -> bool:
    return recipe.attention.method != "dense" or recipe.rope.scaling != "none"


# -- what "restored exactly" compares -----------------------------------------------------------------------

# Module attributes whose entries are other modules, parameters and buffers: compared through `tensors`.
MEMBERS = ("_modules", "_parameters", "_buffers")


def _attribute(value):
    """How one module attribute is compared: the same object, and for containers and tensors the same content
    (dict entries, hooks included, by identity)."""
    if isinstance(value, dict):
        return ("dict", value, dict(value))
    if isinstance(value, (list, set)):
        return ("collection", value, value.copy())
    if torch.is_tensor(value):
        return ("tensor", value, value.detach().clone())
    return ("value", value, None)


def _same_attribute(before, after) -> bool:
    kind, value, content = before
    if after[0] != kind or after[1] is not value and not (kind == "value" and after[1] == value):
        return False
    if kind == "dict":
        return content.keys() == after[2].keys() and all(after[2][key] is item for key, item in content.items())
    if kind == "collection":
        return content == after[2]
    if kind == "tensor":
        return torch.equal(content, after[2])
    return True


@torch.no_grad()
def snapshot(model, ids) -> dict:
    """Everything `remove` must give back: outputs, tensors, configs, and each module's attributes and hooks."""
    out = model(ids)
    generated = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    tensors = {}
    for kind, named in (("parameter", model.named_parameters), ("buffer", model.named_buffers)):
        for name, tensor in named(remove_duplicate=False):
            tensors[f"{kind} {name}"] = (tensor, tensor.dtype, tensor.device, tensor.requires_grad, tensor.clone())
    configs = {id(module.config): module.config for module in model.modules() if hasattr(module, "config")}
    configs = {key: (config.to_dict(), config._attn_implementation) for key, config in configs.items()}
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        modules[name or "model"] = (
            type(module),
            {key: _attribute(value) for key, value in vars(module).items() if key not in MEMBERS},
            {key: list(vars(module)[key]) for key in MEMBERS},
        )
    return {
        "logits": out.logits,
        "cache": type(out.past_key_values),
        "generated": generated,
        "tensors": tensors,
        "configs": configs,
        "generation_config": model.generation_config.to_dict(),
        "modules": modules,
    }


def assert_restored(before: dict, after: dict) -> None:
    assert torch.equal(after["logits"], before["logits"]), "logits differ after remove"
    assert after["cache"] is before["cache"], "forward returns another cache type after remove"
    assert torch.equal(after["generated"], before["generated"]), "generate gives other tokens after remove"
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, dtype, device, grad, value) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[0] is tensor, f"{name} is another tensor object"
        assert (now[1], now[2], now[3]) == (dtype, device, grad), f"{name}: dtype, device or requires_grad changed"
        assert torch.equal(now[4], value), f"{name} changed value"
    assert after["configs"] == before["configs"], "a config (or its attention implementation) changed"
    assert after["generation_config"] == before["generation_config"]
    assert after["modules"].keys() == before["modules"].keys()
    for name, (cls, attributes, members) in before["modules"].items():
        now_cls, now_attributes, now_members = after["modules"][name]
        assert now_cls is cls, f"{name} changed class"
        assert now_members == members, f"{name}'s submodules, parameters or buffers changed"
        assert now_attributes.keys() == attributes.keys(), (
            f"{name} attributes added {sorted(now_attributes.keys() - attributes.keys())}, "
            f"removed {sorted(attributes.keys() - now_attributes.keys())}"
        )
        for key, value in attributes.items():
            assert _same_attribute(value, now_attributes[key]), f"{name}.{key} not restored"


# -- the tests -----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread; on a busy CPU, waiting for it costs several times the
    work (this file: 20 s on one thread, about 3 minutes on two, under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def run_patched(model, recipe: Recipe, ids, before: dict) -> torch.Tensor:
    """Forward and generate on the patched model; its logits."""
    logits = model(ids).logits
    assert logits.shape == (*ids.shape, VOCAB) and torch.isfinite(logits).all()
    if changes_the_model(recipe):
        assert not torch.equal(logits, before["logits"]), "the patch changes nothing past the training length"
    else:
        assert torch.equal(logits, before["logits"]), "a recipe without attention or rope changes the logits"
    out = model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True
    )
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    if recipe.attention.method != "dense":  # generate ran on the method's own cache
        assert type(out.past_key_values).__module__.startswith("lcpatch.")
    return logits


def assert_unpatched(model) -> None:
    assert "not patched" in lcpatch.describe(model)
    for name in ("forward", "generate", "save_pretrained", "extra_repr"):
        method = getattr(model, name)
        assert getattr(method, "__func__", None) is getattr(type(model), name), f"model.{name} is still shadowed"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.filterwarnings("ignore:lcpatch. generation.decode is 'graph' but the model is on cpu:RuntimeWarning")
def test_recipe_applies_runs_and_removes_exactly(case, family, make_model, request):
    fixed_in, error = UPSTREAM_BUGS.get((case, family), ((0,), None))
    if TRANSFORMERS < fixed_in:
        reason = f"transformers < {'.'.join(map(str, fixed_in))} raises {error.__name__} here by itself"
        request.applymarker(pytest.mark.xfail(raises=error, strict=True, reason=reason))
    model = make_model(family)
    recipe = lcpatch.load_recipe(CASES[case])
    ids = random_ids(LENGTH, batch=2)
    before = snapshot(model, ids)

    refused = REFUSED.get((case, family))
    if refused is not None:
        with pytest.raises(refused[0], match=refused[1]):
            lcpatch.apply(model, recipe)
    else:
        assert lcpatch.apply(model, recipe) is model
        patched = run_patched(model, recipe, ids, before)
        lcpatch.remove(model)
    assert_unpatched(model)
    assert_restored(before, snapshot(model, ids))
    if refused is None:
        with torch.no_grad(), lcpatch.patched(model, recipe):  # nothing left behind changes a second patch
            assert torch.equal(model(ids).logits, patched)

    # Nothing of lcpatch (a registry entry, a hook's closure) keeps the removed model alive.
    freed = weakref.ref(model)
    del model, before
    if freed() is not None:
        gc.collect()  # a reference cycle inside transformers' model is not lcpatch's doing
    assert freed() is None, "something still holds the model after remove"


@functools.cache
def _covered() -> dict[str, set[str]]:
    """What the cases above run, by the kinds of `registered()`."""
    recipes = [lcpatch.load_recipe(spec) for spec in CASES.values()]
    default = Recipe()
    table = lcpatch.supported_models()
    model_types = {tiny_model(name).config.model_type for name in FAMILIES}
    return {
        "built-in recipes": set(BUILTIN),
        "families": {next((r["family"] for r in table if t in r["model_types"]), t) for t in model_types},
        "attention methods": {recipe.attention.method for recipe in recipes},
        "rope scalings": {recipe.rope.scaling for recipe in recipes},
        "training methods": {recipe.training.method for recipe in recipes if recipe.training is not None},
        # A section is covered where some case sets it to something else than its default.
        "recipe sections": {
            field.name
            for field in dataclasses.fields(Recipe)
            for recipe in recipes
            if getattr(recipe, field.name) != getattr(default, field.name)
        },
        "decode modes": {recipe.generation.decode for recipe in recipes},
    }


@pytest.mark.parametrize("kind", sorted(registered()))
def test_every_registered_name_has_a_conformance_case(kind):
    names, covered = registered()[kind], _covered()[kind]
    assert names <= covered, f"{kind} {sorted(names - covered)} registered without a case here (CASES, FAMILIES)"
    assert covered <= names, f"{kind} {sorted(covered - names)} run here but no longer registered"
