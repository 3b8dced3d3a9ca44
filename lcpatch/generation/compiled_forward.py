"""`generation.compile`: the fast path's decode step through torch.compile before it is captured.

A captured step still runs every kernel the eager forward launches, and most of those are tiny: RMSNorm's
five, the rotary embedding applied with the identity angles lcpatch hands the layers, SiLU and the product
with the up projection, residual adds. On a Llama-3-8B shape that is ~60 launches per layer, a third of
the step's time at batch 1. Inductor fuses them into a few kernels per layer; the matrix products stay
cuBLAS calls. Attention and the cache's writes are not traced (`lcpatch_attention` and
`StepAwareCache.update` are `torch.compiler.disable`d): they launch lcpatch's own kernels and keep
host-side counts that would make every token a new graph. A CUDA graph then records the compiled kernels
like any others, so the compiled code runs twice per capture (warm-up, capture) and never per token.

The prefill's chunks stream through the decoder compiled the same way: over a chunk of thousands of rows
those small kernels are memory-bound passes (RMSNorm alone reads and writes its rows five times in
float32), a quarter of an 8B model's 128k prefill on an H100 before they were fused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _dynamo_settings(layers: int, strict: bool) -> dict:
    # Each layer's attention forward is compiled apart (dynamo keeps its layer index a constant): per layer,
    # an entry for the decode step's first batch size and one for any later size, and the same two for the
    # prefill's chunks (the first chunk length, then any), past dynamo's default of 8 per function.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    return {limit: 4 * layers + 8, "suppress_errors": not strict}


class CompiledForward:
    """A forward compiled once per patched model: the model's, for its single-token decode steps, or its
    decoder's, for the chunks of a prefill.

    `strict` (generation.compile: true) lets a compile error reach the caller; under auto, a frame that
    dynamo cannot compile runs eagerly (dynamo logs why) and the step still decodes, only slower.
    """

    def __init__(self, forward: Callable, layers: int, strict: bool):
        # Rounded to the dtype wherever eager rounds, so that fused kernels give eager's tokens. Shapes are
        # dynamo's default: static at first, the batch size symbolic from the second one on (static for
        # every size would recompile every layer per size and soon hit the recompile limit).
        self.compiled = torch.compile(forward, options={"emulate_precision_casts": True})
        self.settings = _dynamo_settings(layers, strict)

    def __call__(self, **kwargs):
        with torch._dynamo.config.patch(**self.settings):
            return self.compiled(**kwargs)
