"""The public entry points: apply, remove, patched, describe, make_cache."""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .attention import ATTENTION_METHODS, Dense
from .attention.interface import RUNTIMES
from .errors import LcpatchError, PatchStateError, UnsupportedModelError
from .generation import install_generate
from .models import ModelStructure, find_structure
from .models.structure import unwrap
from .patching import AttributeSettings, PatchLog
from .recipe import UNBOUNDED_CONTEXT, Recipe, RecipeLike, load_recipe
from .runtime import PatchRuntime
from .serialization import install_save_pretrained


@dataclass
class _Patched:
    recipe: Recipe  # with every `auto` resolved
    structure: ModelStructure
    log: PatchLog
    runtime: PatchRuntime | None


_PATCHED: weakref.WeakKeyDictionary[PreTrainedModel, _Patched] = weakref.WeakKeyDictionary()


def _label(recipe: Recipe) -> str:
    return recipe.name or recipe.attention.method


def _base_model(model, call: str, expected: str) -> PreTrainedModel:
    """The transformers model that `call` (e.g. "lcpatch.remove(model)") works on; an error naming what was
    passed and what `call` takes otherwise."""
    try:
        return unwrap(model)
    except UnsupportedModelError:
        pass
    shown = repr(model) if isinstance(model, (str, int, float, type(None))) else f"a {type(model).__name__}"
    fix = ""
    if isinstance(model, str):
        fix = "; load it first, e.g. AutoModelForCausalLM.from_pretrained(name)"
    elif isinstance(model, PreTrainedTokenizerBase):
        fix = "; pass the model, not its tokenizer"
    raise UnsupportedModelError(f"{call} takes {expected}; got {shown}{fix}.")


_CAUSAL_LM = "a transformers causal LM (AutoModelForCausalLM, or a PEFT model wrapping one)"
_PATCHED_LM = "a model patched with lcpatch.apply (a transformers causal LM, or a PEFT model wrapping one)"


def apply(model, recipe: RecipeLike):
    """Patch this model instance with `recipe` (built-in name, YAML path, dict or Recipe); return the model.

    Only the instance changes: its attention implementation, rotary embedding output, cache and
    `generate`, and the context length its config advertises (`Recipe.context_length`: no limit for lm-infinite,
    streaming-llm and infllm, factor × the training length for a RoPE scaling with dense attention).
    `lcpatch.remove(model)` undoes all of it.
    """
    return _apply(model, recipe, "lcpatch.apply(model, recipe)")


def _apply(model, recipe: RecipeLike, call: str):
    base = _base_model(model, call, _CAUSAL_LM)
    loaded = load_recipe(recipe)
    if base in _PATCHED:
        raise PatchStateError(
            f"this {type(base).__name__} is already patched with recipe '{_label(_PATCHED[base].recipe)}'; "
            "call lcpatch.remove(model) before applying another recipe."
        )
    structure = find_structure(base)
    resolved = loaded.resolve(structure.training_length)
    log = PatchLog()
    try:
        # RoPE first: an attention method that rotates keys itself must use the scaled tables.
        structure = resolved.rope.install(structure, isinstance(resolved.attention, Dense), log)
        runtime = None
        if isinstance(resolved.attention, Dense):
            resolved.attention.install(structure, log)
        else:
            method = resolved.attention.build(structure)
            runtime = PatchRuntime(structure, method, resolved.attention.method)
            runtime.install(log, RUNTIMES)
        install_generate(base, resolved, runtime, log)
        # Last: what came before reads the model's own config (the rotary tables are built from a copy of it).
        own_config = _advertise_context_length(structure, resolved, log)
        for owner in {id(base): base, id(model): model}.values():
            install_save_pretrained(owner, resolved, log, own_config)
        summary = f"lcpatch={_label(resolved)}({_attention_fields(resolved)})"
        log.set_instance_attr(base, "extra_repr", lambda: summary)
        _PATCHED[base] = _Patched(resolved, structure, log, runtime)
        log.on_undo(lambda: _PATCHED.pop(base, None))
    except BaseException:
        log.undo()
        raise
    return model


def _advertise_context_length(structure: ModelStructure, recipe: Recipe, log: PatchLog):
    """Set `config.max_position_embeddings` to `recipe.context_length(...)`, which transformers reads while
    generating (it caps the default `max_length` and warns "exceeded the model's predefined maximum length" past
    it) and other tools cut or size their input by; return the context manager under which the config holds the
    model's own values again (for `save_pretrained`).

    Where the config has no `original_max_position_embeddings`, it gets the training length: transformers' name
    for the pretraining length of an extended model (Phi-3, YaRN configs), where lcpatch (`training_length`) and
    other tools then find it. The model's rotary embedding keeps reading a copy of its own config, since a
    dynamic-NTK one recomputes its frequencies from `max_position_embeddings` as inputs grow. The config object
    may be shared by other models (`type(model)(model.config)`): they see the values too while this one is patched.
    """
    length = recipe.context_length(structure.training_length)
    if length is None:
        return contextlib.nullcontext
    configs = [structure.config]  # the decoder's; the model's own too where it is another (a composite) config
    if structure.model.config is not structure.config and hasattr(structure.model.config, "max_position_embeddings"):
        configs.append(structure.model.config)
    settings = []
    for config in configs:
        settings.append((config, "max_position_embeddings", length))
        if not hasattr(config, "original_max_position_embeddings"):
            settings.append((config, "original_max_position_embeddings", structure.training_length))
    rotary = structure.rotary_emb
    if any(rotary.__dict__.get("config") is config for config in configs):
        log.set_instance_attr(rotary, "config", copy.deepcopy(rotary.config))
    advertised = AttributeSettings(settings)
    advertised.install(log)
    return advertised.withheld


def remove(model) -> None:
    """Undo `apply` on this model: every hook, attribute and setting goes back to what it was."""
    base = _base_model(model, "lcpatch.remove(model)", _PATCHED_LM)
    state = _PATCHED.get(base)
    if state is None:
        raise PatchStateError(
            f"this {type(base).__name__} is not patched by lcpatch, so there is nothing to remove; "
            "lcpatch.describe(model) shows a model's patch."
        )
    state.log.undo()


@contextlib.contextmanager
def patched(model, recipe: RecipeLike) -> Iterator:
    """`with lcpatch.patched(model, "lm-infinite"): ...` — the patch is removed on exit, exceptions too."""
    _apply(model, recipe, "lcpatch.patched(model, recipe)")
    try:
        yield model
    finally:
        remove(model)


def _attention_fields(recipe: Recipe) -> str:
    fields = recipe.to_dict()["attention"]
    return ", ".join(f"{k}={v}" for k, v in fields.items() if k != "method")


def describe(model) -> str:
    """What lcpatch did to this model: recipe (autos resolved), family, per-layer cache bound, advertised length."""
    base = _base_model(model, "lcpatch.describe(model)", _CAUSAL_LM + ", patched or not")
    state = _PATCHED.get(base)
    if state is None:
        return f"{type(base).__name__}: not patched by lcpatch."
    s = state.structure
    lines = [
        f"{type(base).__name__} ({s.family.name}, {len(s.attentions)} layers, trained at {s.training_length} tokens) "
        f"patched with '{_label(state.recipe)}':",
        state.recipe.to_yaml().rstrip(),
    ]
    if state.runtime is not None:
        sizes = sorted(set(state.runtime.method.cache_sizes()))
        # Λ caches never exceed this; InfLLM keeps this many on the device, its memory blocks beyond it.
        lines.append(f"KV positions on the device per layer: {' / '.join(map(str, sizes))}")
    length = getattr(s.config, "max_position_embeddings", None)
    if length is not None:
        lines.append(
            f"config.max_position_embeddings: {length}" + (" (no limit)" if length == UNBOUNDED_CONTEXT else "")
        )
    return "\n".join(lines)


def patched_recipe(model) -> Recipe | None:
    """The resolved recipe a model is patched with, or None."""
    state = _PATCHED.get(_base_model(model, "lcpatch.api.patched_recipe(model)", _CAUSAL_LM))
    return state.recipe if state else None


def make_cache(model):
    """A fresh cache of the patched method (e.g. a bounded LambdaCache), to pass as the cache argument of
    forward() or generate()."""
    base = _base_model(model, "lcpatch.make_cache(model)", _PATCHED_LM)
    state = _PATCHED.get(base)
    if state is None or state.runtime is None:
        own = "is not patched by lcpatch" if state is None else f"is patched with {_label(state.recipe)}"
        raise LcpatchError(
            f"lcpatch.make_cache(model) needs a model patched with an attention method that keeps its own cache "
            f"({', '.join(m for m in ATTENTION_METHODS if m != 'dense')}); this {type(base).__name__} {own}, "
            "so it uses transformers' own caches: pass none (generate() makes one) or a transformers DynamicCache."
        )
    return state.runtime.make_cache()
