"""The attention section's default: the model's own attention, or FlashAttention-4 where it can run.

`backend` chooses what computes it, decided when the recipe is applied:
- `model`: the attention the model was loaded with (`attn_implementation`: sdpa by default, eager,
  flash_attention_2, ...), untouched;
- `flash`: transformers' "flash_attention_4" (flash-attn-4, CuTe-DSL kernels for Hopper and Blackwell);
  a BackendError naming the fix where it cannot run;
- `auto`: flash where it runs well, i.e. a model on a Hopper or Blackwell GPU, in bf16 or fp16, loaded with
  one of transformers' default attentions (sdpa, eager), with flash-attn-4 installed; else `model`. A model
  on the CPU keeps its own attention: `auto` follows the device the model is on when the recipe is applied
  (`lcpatch train` decides for the GPU it trains on, see `Dense.for_device`).

On flash attention the trainers pack rows padding-free: position ids restart at 0 for every packed
sequence, and transformers' flash path attends within each one (`lcpatch.training.packing`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ..errors import BackendError
from ..fields import ATTENTION_METHODS, AUTO, SectionConfig, check_choice
from ..models import ModelStructure
from ..patching import PatchLog

BACKENDS = (AUTO, "model", "flash")
FLASH_ATTENTION = "flash_attention_4"
# The implementations whose varlen path keeps packed sequences apart (transformers' flash integrations).
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", FLASH_ATTENTION)
# What `auto` may replace: transformers' defaults. Any other choice (flash_attention_2, flex_attention, a Hub
# kernel) was made on purpose when the model was loaded, and is kept.
DEFAULT_IMPLEMENTATIONS = (None, "sdpa", "eager")
FLASH_ARCHITECTURES = {9: "Hopper", 10: "Blackwell"}
FLASH_FIX = (
    'install flash-attn-4 with `pip install "lcpatch[flash]"` (Hopper and Blackwell GPUs; on older GPUs, load the '
    'model with attn_implementation="flash_attention_2" from flash-attn 2 and use backend: model), or use '
    "backend: auto (flash attention where it can run, else the model's own)"
)


@ATTENTION_METHODS.register("dense")
@dataclass(frozen=True)
class Dense(SectionConfig):
    """The model's own attention (`backend: model`), FlashAttention-4 (`flash`), or flash where it can run (`auto`)."""

    backend: str = AUTO

    def __post_init__(self) -> None:
        check_choice("attention", "backend", self.backend, BACKENDS)

    def resolve(self, training_length: int) -> Dense:
        return self  # auto is decided by the model's device when applied

    def for_device(self, model, device: torch.device) -> Dense:
        """This section with `auto` decided for `model` running on `device` (e.g. the GPU a trainer will move
        it to): `flash` where flash attention runs there, else `model`."""
        if self.backend != AUTO:
            return self
        return replace(self, backend="flash" if _auto_problem(model, device) is None else "model")

    def install(self, structure: ModelStructure, log: PatchLog) -> None:
        """Switch the decoder to flash attention where the backend says so (the log's undo switches it back)."""
        model = structure.model
        if self.backend == "model" or (self.backend == AUTO and _auto_problem(model, _device(model)) is not None):
            return
        if self.backend == "flash":
            problem = _flash_problem(model, _device(model))
            if problem is not None:
                fix = FLASH_FIX if model._supports_flash_attn else "use backend: model (or auto)"
                raise BackendError(f"attention.backend is 'flash' but {problem}; {fix}.")
        log.set_property(structure.config, "_attn_implementation", FLASH_ATTENTION)


def runs_flash_attention(model) -> bool:
    """Whether the model (or the model under a PEFT wrapper) attends with one of transformers' flash
    implementations, whose varlen path keeps sequences packed with restarting position ids apart."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return base.config.get_text_config()._attn_implementation in FLASH_IMPLEMENTATIONS


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _auto_problem(model, device: torch.device) -> str | None:
    """Why `auto` keeps the model's own attention on `device`, or None where it takes flash attention."""
    if device.type != "cuda":
        return f"the model is on {device.type}"
    own = model.config.get_text_config()._attn_implementation
    if own not in DEFAULT_IMPLEMENTATIONS:
        return f"the model was loaded with attn_implementation={own!r}"
    if model.dtype not in (torch.bfloat16, torch.float16):
        return f"the model is in {model.dtype} (flash attention computes in bf16 or fp16)"
    return _flash_problem(model, device)


def _flash_problem(model, device: torch.device) -> str | None:
    """Why FlashAttention-4 cannot run this model on `device` (a model still on the CPU: the current GPU,
    where a trainer will move it), or None."""
    if not model._supports_flash_attn:
        return f"transformers' {type(model).__name__} does not support flash attention"
    if not torch.cuda.is_available():
        return f"no CUDA GPU is available (the model is on {device.type})"
    if device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    if major not in FLASH_ARCHITECTURES:
        name = torch.cuda.get_device_name(device)
        return (
            f"{name} has compute capability {major}.{minor}, and flash-attn-4 runs on "
            + " and ".join(f"{arch} ({cc}.x)" for cc, arch in FLASH_ARCHITECTURES.items())
            + " GPUs"
        )
    return _flash_import_problem()


@functools.cache
def _flash_import_problem() -> str | None:
    """Why flash-attn-4's functions (what transformers' "flash_attention_4" imports) cannot be imported, or None."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except Exception as exc:  # a missing package, or one whose compiler stack (cutlass) does not load
        return f"flash-attn-4 cannot be imported (from flash_attn.cute: {type(exc).__name__}: {exc})"
    return None
