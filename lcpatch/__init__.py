"""lcpatch: long context for an existing Hugging Face causal LM, with one call.

lcpatch.apply(model, "lm-infinite")   # patch this instance
lcpatch.remove(model)                 # exact original behaviour back

The public names below load on first use, so that `import lcpatch` (and the `lcpatch` command's --help and
--version) does not import torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

from ._compat import TRANSFORMERS_RANGE as TRANSFORMERS_RANGE  # public
from ._compat import check_version


def _loaded_or_installed_version(package: str) -> str:
    # The module already imported is what lcpatch would run against; else the installed distribution.
    module = sys.modules.get(package)
    return module.__version__ if module is not None else metadata.version(package)


# At import, before anything touches transformers' internals: a version outside the range fails here, clearly.
check_version("transformers", _loaded_or_installed_version("transformers"))
check_version("torch", _loaded_or_installed_version("torch"))

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_PUBLIC = {
    "apply": "api",
    "describe": "api",
    "make_cache": "api",
    "patched": "api",
    "remove": "api",
    "supported_models": "attention.support",
    "BlockMemoryCache": "cache",
    "LambdaCache": "cache",
    "BackendError": "errors",
    "CacheError": "errors",
    "LcpatchError": "errors",
    "PatchStateError": "errors",
    "RecipeError": "errors",
    "SequenceLimitError": "errors",
    "UnsupportedModelError": "errors",
    "UnsupportedVersionError": "errors",
    "Recipe": "recipe",
    "builtin_recipes": "recipe",
    "load_recipe": "recipe",
    "from_pretrained": "serialization",
}

__all__ = sorted(["TRANSFORMERS_RANGE", *_PUBLIC])


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lcpatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
