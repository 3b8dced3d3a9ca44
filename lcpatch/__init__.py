"""lcpatch: long context for an existing Hugging Face causal LM, with one call.

lcpatch.apply(model, "lm-infinite")   # patch this instance
lcpatch.remove(model)                 # exact original behaviour back
"""

from __future__ import annotations

import torch as _torch
import transformers as _transformers

from ._compat import TRANSFORMERS_RANGE, check_version

# At import, before anything touches transformers' internals: a version outside the range fails here, clearly.
check_version("transformers", _transformers.__version__)
check_version("torch", _torch.__version__)

from .api import apply, describe, make_cache, patched, remove  # noqa: E402
from .attention.interface import register as _register_attention  # noqa: E402
from .attention.support import supported_models  # noqa: E402
from .cache import BlockMemoryCache, LambdaCache  # noqa: E402
from .errors import (  # noqa: E402
    BackendError,
    CacheError,
    LcpatchError,
    PatchStateError,
    RecipeError,
    SequenceLimitError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from .recipe import Recipe, builtin_recipes, load_recipe  # noqa: E402
from .serialization import from_pretrained  # noqa: E402

_register_attention()

__version__ = "0.1.0"

__all__ = [
    "TRANSFORMERS_RANGE",
    "BackendError",
    "BlockMemoryCache",
    "CacheError",
    "LambdaCache",
    "LcpatchError",
    "PatchStateError",
    "Recipe",
    "RecipeError",
    "SequenceLimitError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "apply",
    "builtin_recipes",
    "describe",
    "from_pretrained",
    "load_recipe",
    "make_cache",
    "patched",
    "remove",
    "supported_models",
]
