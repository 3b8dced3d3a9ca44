"""`generation.decode`: how `generate()` decodes on a patched model.

- eager: the model's own forward over LambdaCache, step by step.
- graph: a cache of static shapes, written in place (`FixedShapeDecoding`: RingLambdaCache for
  lm-infinite and streaming-llm, BlockMemoryCache for infllm), and every single-token step replayed as a
  CUDA graph (`DecodeStep`); a token costs one graph launch, whatever the context length.
- static: the same cache and step without capture (CPU tests, or to rule capture out while debugging).
- auto (default): graph where it can run (a CUDA device), eager elsewhere.

`generation.compile` (auto: wherever the step is captured) runs the step's forward through torch.compile
first (`compiled_forward`), which fuses the small kernels around attention; the graph records the result.
The chunks of the prompt's prefill then stream through the decoder compiled the same way
(`FixedShapeDecoding.prefill_forward`): the same fusions, at a chunk's size.

Where graph or static was asked for and cannot run, generate() decodes eagerly and says why, once per
patched model (a RuntimeWarning). The fast path shadows `forward` on this instance only, and only
keyword calls of one token per row on such a cache go to the step; `lcpatch.remove` restores it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from .._compat import CACHE_ARG
from ..cache.step import FixedShapeDecoding
from ..patching import PatchLog
from .captured_step import DecodeStep
from .compiled_forward import CompiledForward

# What generate() passes to a decode step; any other argument (output_attentions, ...) runs eagerly.
STEP_ARGUMENTS = frozenset(
    {"input_ids", "attention_mask", "position_ids", CACHE_ARG, "use_cache", "return_dict", "logits_to_keep"}
)


class DecodePlan:
    """The decode path of one patched model: which cache generate() gets, and the one-time fall-back notes."""

    def __init__(self, requested: str, runtime, method_name: str, forward, decoder_forward, compile: bool | str):
        self.requested = requested
        self.runtime = runtime
        self.method_name = method_name
        self.forward = forward
        self.decoder_forward = decoder_forward  # what the chunked prefill streams all but the last chunk through
        self.compile = compile
        # Per forward (the step's, the prefill's), one per model: its compiled code serves every later call.
        self._compiled: dict[Callable, CompiledForward] = {}
        self.supported = runtime is not None and hasattr(runtime.method, "make_decode_cache")
        self.failure: str | None = None  # why capture failed on this model: later calls decode eagerly
        self._said: set[str] = set()

    def make_cache(self, device: torch.device) -> Cache | None:
        """A fresh cache for one generate() call: the fixed-shape one with its DecodeStep, or the eager one."""
        mode = self._mode(device)
        if self.runtime is None:  # a dense model: transformers makes its own cache
            return None
        if mode == "eager":
            return self.runtime.make_cache()
        cache = self.runtime.method.make_decode_cache()
        compiles = self.compile is True or (self.compile == "auto" and mode == "graph")
        step_forward = self._compiled_forward(self.forward) if compiles else self.forward
        cache.decode_step = DecodeStep(step_forward, capture=mode == "graph", on_fallback=self._capture_failed)
        if compiles:
            cache.prefill_forward = self._compiled_forward(self.decoder_forward)
        return cache

    def _compiled_forward(self, forward: Callable) -> CompiledForward:
        """`forward` (the decode step's, or the prefill's decoder call) through torch.compile."""
        if forward not in self._compiled:
            layers = len(self.runtime.structure.attentions)
            self._compiled[forward] = CompiledForward(forward, layers, strict=self.compile is True)
        return self._compiled[forward]

    def _mode(self, device: torch.device) -> str:
        if self.requested == "eager":
            return "eager"
        reason = self._unavailable(device)
        if reason is None:
            return "graph" if self.requested == "auto" else self.requested
        if self.requested != "auto":
            self._say(reason)
        return "eager"

    def _unavailable(self, device: torch.device) -> str | None:
        if not self.supported:
            return (
                f"attention method {self.method_name} has no fixed-size cache "
                "(the fast decode path serves lm-infinite, streaming-llm and infllm)"
            )
        if (problem := self.runtime.method.fast_decode_problem) is not None:
            return problem
        if self.requested != "static" and device.type != "cuda":
            return f"the model is on {device.type}, and CUDA graphs need a CUDA device"
        return self.failure

    def _capture_failed(self, reason: str) -> None:
        self.failure = reason
        self._say(reason)  # even under auto: on a CUDA device the fast path was expected to run

    def _say(self, reason: str) -> None:
        if reason in self._said:
            return
        self._said.add(reason)
        warnings.warn(
            f"lcpatch: generation.decode is '{self.requested}' but {reason}; decoding eagerly instead. "
            "Set generation.decode: eager to choose that path (and silence this note).",
            RuntimeWarning,
            stacklevel=4,
        )


def _decode_step_inputs(kwargs: dict):
    """(ids, positions, valid) of a call that the cache's DecodeStep can run, else None."""
    cache, ids = kwargs.get(CACHE_ARG), kwargs.get("input_ids")
    if not isinstance(cache, FixedShapeDecoding) or cache.decode_step is None or torch.is_grad_enabled():
        return None
    given = {name for name, value in kwargs.items() if value is not None}  # wrappers (PEFT) pass None for the rest
    if not torch.is_tensor(ids) or ids.ndim != 2 or ids.shape[1] != 1 or not STEP_ARGUMENTS.issuperset(given):
        return None
    if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
        return None
    positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if positions is None:  # as the model's forward would number them
        positions = torch.full_like(ids, cache.get_seq_length())
    if positions.ndim != 2 or (mask is not None and (not torch.is_tensor(mask) or mask.ndim != 2)):
        return None
    valid = mask[:, -1:] if mask is not None else torch.ones_like(ids)
    return ids, positions.expand_as(ids), valid


def install_fast_decode(
    model, requested: str, runtime, method_name: str, log: PatchLog, compile: bool | str
) -> DecodePlan:
    """The model's DecodePlan; shadow `model.forward` so that single-token steps on a fixed-shape cache
    run through its DecodeStep (only where the plan can ever make one)."""
    original = model.forward
    decoder = model.get_decoder()

    def decoder_call(**kwargs):  # a module call, not `decoder.forward`: the runtime's hooks record the positions
        return decoder(**kwargs)

    plan = DecodePlan(requested, runtime, method_name, original, decoder_call, compile)
    if not plan.supported or requested == "eager":
        return plan

    # functools.wraps keeps the signature, which generate() inspects (position_ids, logits_to_keep).
    @functools.wraps(original)
    def forward(*args, **kwargs):
        inputs = None if args else _decode_step_inputs(kwargs)
        if inputs is None:
            return original(*args, **kwargs)
        cache = kwargs[CACHE_ARG]
        return cache.decode_step(cache, *inputs)

    log.set_instance_attr(model, "forward", forward)
    return plan
