"""One decode step of a patched model over its fixed-shape cache (`FixedShapeDecoding`: RingLambdaCache,
or InfLLM's BlockMemoryCache), on fixed input buffers, optionally captured once as a CUDA graph and
replayed for every later token.

The step is the model's own forward (with lcpatch's hooks) called on three (batch, 1) buffers: token
ids, positions and padding validity. The cache writes in place at addresses that change only when it
says so (`layout_version`), so the kernels a step launches are the same each time and one
`torch.cuda.CUDAGraph` replays them all: a token costs one graph launch instead of hundreds of kernel
launches. Host-side work between tokens (InfLLM forming a memory block) runs before the replay
(`begin_decode_step`). Without capture (CPU, or `generation.decode: static`) the same step runs
eagerly, which is how the tests check it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._compat import CACHE_ARG
from ..cache.step import FixedShapeDecoding


class DecodeStep:
    """Runs single-token forwards for one cache; `on_fallback(reason)` is told when capture fails."""

    def __init__(self, forward: Callable, capture: bool, on_fallback: Callable[[str], None]):
        self.forward = forward  # the model's forward as it was before the fast decode path shadowed it
        self.capture = capture
        self.on_fallback = on_fallback
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.layout_version = -1
        self.graph: torch.cuda.CUDAGraph | None = None
        # The captured forward's output type and logits, which each replay rewrites. Not the output
        # itself: it holds the cache, which holds this step (a cycle only the garbage collector frees).
        self.output_type, self.logits = None, None

    def __call__(self, cache: FixedShapeDecoding, input_ids, position_ids, valid):
        cache.begin_decode_step(valid)
        try:
            return self._step(cache, input_ids, position_ids, valid)
        finally:
            cache.end_decode_step()

    def _step(self, cache: FixedShapeDecoding, input_ids, position_ids, valid):
        if (
            self.inputs is None
            or self.inputs[0].shape != input_ids.shape
            or self.layout_version != cache.layout_version
        ):
            # First step, or the cache was re-allocated (another batch size): start again from eager.
            self.inputs = (torch.empty_like(input_ids), torch.empty_like(position_ids), torch.empty_like(valid))
            self.graph, self.layout_version = None, cache.layout_version
        for buffer, value in zip(self.inputs, (input_ids, position_ids, valid), strict=True):
            buffer.copy_(value)
        if self.graph is not None:
            self.graph.replay()
            for layer in cache.layers:  # a replay runs no Python: count its token here
                layer.cumulative_length += 1
            return self.output_type(logits=self.logits.clone(), **{CACHE_ARG: cache})
        if self.capture and (reason := cache.capture_blocker()) is not None:
            self.capture = False
            self.on_fallback(reason)
        if not self.capture:
            return self._run(cache)
        # Warm up (and run this token) on a side stream, as CUDA graph capture requires; then record.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = self._run(cache)
        torch.cuda.current_stream().wait_stream(side)
        self._capture(cache)
        return output

    def _run(self, cache: FixedShapeDecoding):
        ids, positions, valid = self.inputs
        return self.forward(
            input_ids=ids, attention_mask=valid, position_ids=positions, use_cache=True, **{CACHE_ARG: cache}
        )

    def _capture(self, cache: FixedShapeDecoding) -> None:
        lengths = [layer.cumulative_length for layer in cache.layers]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self._run(cache)
        except Exception as exc:  # e.g. an op that syncs with the host: the step stays eager
            self.capture = False
            first_line = (str(exc).splitlines() or [""])[0][:200]
            self.on_fallback(f"capturing the decode step as a CUDA graph failed ({type(exc).__name__}: {first_line})")
            return
        finally:
            # Capture ran the Python but no kernel: the token was already counted by the warm-up run.
            for layer, length in zip(cache.layers, lengths, strict=True):
                layer.cumulative_length = length
        self.graph, self.layout_version = graph, cache.layout_version
        self.output_type, self.logits = type(output), output.logits
