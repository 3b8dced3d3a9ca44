"""Saving a patched model: original weights as transformers writes them, plus the recipe beside them."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from .patching import PatchLog
from .recipe import Recipe

RECIPE_FILE = "lcpatch_recipe.yaml"


def install_save_pretrained(
    obj,
    recipe: Recipe,
    log: PatchLog,
    own_config: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """Shadow `obj.save_pretrained` so the folder also gets `lcpatch_recipe.yaml`.

    The weights and config are transformers' own (lcpatch changes no parameter, its attention setting is not
    serialised, and the config is written inside `own_config()`, which puts back the model's own context length),
    so the folder still loads in plain transformers without lcpatch.
    """
    original = obj.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory, *args, **kwargs):
        with own_config():
            result = original(save_directory, *args, **kwargs)
        Path(save_directory, RECIPE_FILE).write_text(recipe.to_yaml())
        return result

    log.set_instance_attr(obj, "save_pretrained", save_pretrained)


def from_pretrained(path: str | Path, **kwargs):
    """Load a folder written by a patched model's `save_pretrained` and re-apply its recipe.

    Keyword arguments go to `AutoModelForCausalLM.from_pretrained` (dtype, device_map, ...).
    """
    from transformers import AutoModelForCausalLM

    from .api import apply
    from .errors import RecipeError

    recipe_path = Path(path) / RECIPE_FILE
    if not Path(path).is_dir():
        raise RecipeError(
            f"lcpatch.from_pretrained({str(path)!r}) needs a folder written by a patched model's save_pretrained; "
            "there is no such folder. For a Hub model, load it with transformers and call lcpatch.apply(model, recipe)."
        )
    if not recipe_path.is_file():
        raise RecipeError(
            f"{path} has no {RECIPE_FILE}: it was not saved from a patched model. "
            "Load it with transformers and call lcpatch.apply(model, recipe)."
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if (Path(path) / "adapter_config.json").is_file():
        _load_adapter_weights(model, Path(path))
    return apply(model, recipe_path)


def _load_adapter_weights(model, path: Path) -> None:
    """Load an adapter folder's weights into `model` (its adapter already injected) through PEFT itself.

    transformers 5.17 loads the LoRA weights of such a folder but reports the trained `modules_to_save` copies
    (LOGO's embeddings and norms) as unexpected keys and leaves the base weights in them; PEFT maps those keys.
    Where transformers got it right this loads the same values a second time.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    from .errors import RecipeError

    prefix = "base_model.model."  # PeftModel's; the adapter sits in the bare model here
    saved = {key.removeprefix(prefix): value for key, value in load_peft_weights(str(path)).items()}
    result = set_peft_model_state_dict(model, saved, adapter_name="default")
    if result.unexpected_keys:
        raise RecipeError(
            f"the adapter in {path} has weights this model has no place for: {sorted(result.unexpected_keys)[:5]}; "
            "load it with peft.PeftModel.from_pretrained on its base model and call lcpatch.apply(model, recipe)."
        )
