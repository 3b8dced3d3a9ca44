"""The attention function lcpatch registers in transformers' AttentionInterface.

One function serves every patched model: it finds the runtime of the module it is called for,
so two models in one process can carry different recipes.
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface

from ..errors import PatchStateError

RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Not traced by torch.compile (`generation.compile`): the methods' attention launches lcpatch's own kernels
# and reads the cache's host-side state; the compiled graphs run around it.
@torch.compiler.disable
def lcpatch_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    runtime = RUNTIMES.get(module)
    if runtime is None:
        raise PatchStateError(
            f"{type(module).__name__} uses attn_implementation 'lcpatch' but its model is not patched; "
            "call lcpatch.apply(model, recipe) instead of setting the implementation by hand."
        )
    return runtime.attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    AttentionInterface.register("lcpatch", lcpatch_attention)


# At import: every way to patch a model (lcpatch.api) imports this module first.
register()
