"""Standard RoPE scaling (linear, dynamic, yarn, llama3, longrope) and a new base θ, applied to a loaded model instance.

The new rotary tables come from transformers' own code: the model's rotary embedding class is
built again from a copy of its config whose `rope_parameters` name the new scaling (so
`ROPE_INIT_FUNCTIONS` computes them), and its state is moved onto the model's module. The model's
config stays untouched; `remove` puts the module's original buffers and attributes back.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import RecipeError, UnsupportedModelError
from ..fields import AUTO, ROPE_SCALINGS, SectionConfig, check_int, check_number
from ..models.structure import ModelStructure, find_structure
from ..patching import PatchLog


@ROPE_SCALINGS.register("none")
@dataclass(frozen=True)
class NoScaling(SectionConfig):
    """The model's own RoPE, untouched."""

    length_dependent: ClassVar[bool] = False

    def resolve(self, training_length: int) -> NoScaling:
        return self

    def install(self, structure: ModelStructure, dense: bool, log: PatchLog) -> ModelStructure:
        return structure


@dataclass(frozen=True)
class RebuiltRotary(SectionConfig):
    """A scaling whose tables come from the model's rotary class rebuilt with new `rope_parameters`."""

    scaling: ClassVar[str]  # given by ROPE_SCALINGS.register
    # dynamic and longrope pick their frequencies from each input's length inside the rotary module;
    # Λ attention rotates keys itself with tables read once at apply, so it cannot follow them.
    length_dependent: ClassVar[bool] = False
    # Factor scalings replace the model's rope type (and its parameters) with theirs; a new base keeps them.
    keeps_rope_type: ClassVar[bool] = False

    def resolve(self, training_length: int) -> RebuiltRotary:
        return self

    def rope_parameters(self, training_length: int) -> dict[str, Any]:
        raise NotImplementedError

    def install(self, structure: ModelStructure, dense: bool, log: PatchLog) -> ModelStructure:
        _swap_rotary_state(structure, self, log)
        return find_structure(structure.model)  # re-read (and re-check) the tables Λ attention rotates with


@ROPE_SCALINGS.register("base")
@dataclass(frozen=True)
class Base(RebuiltRotary):
    """A new RoPE base θ, the model's rope type kept: every frequency θ^(-2i/d) recomputed ("adjusted base
    frequency", Xiong et al., 2023; LongPO raises θ at each context-extension stage)."""

    keeps_rope_type: ClassVar[bool] = True

    theta: float | None = None

    def __post_init__(self) -> None:
        if self.theta is None:
            raise RecipeError("rope.scaling base needs rope.theta, the new RoPE base (e.g. 1000000).")
        check_number("rope", "theta", self.theta, greater_than=1)

    def rope_parameters(self, training_length: int) -> dict[str, Any]:
        return {"rope_theta": float(self.theta)}


@dataclass(frozen=True)
class FactorScaling(RebuiltRotary):
    """A transformers rope type stretched by `factor` (auto: target_length / the model's training length)."""

    factor: float | str = AUTO
    target_length: int | None = None

    def __post_init__(self) -> None:
        check_number("rope", "factor", self.factor, greater_than=0, allow_auto=True)
        if self.target_length is not None:
            check_int("rope", "target_length", self.target_length, minimum=1)
        if self.factor == AUTO and self.target_length is None:
            raise RecipeError(
                f"rope.factor is 'auto' (= rope.target_length / the model's training length) for scaling "
                f"{self.scaling}, but rope.target_length is not set; give rope.target_length (e.g. 32768) "
                "or a number for rope.factor."
            )

    def resolve(self, training_length: int) -> FactorScaling:
        if self.factor != AUTO:
            return self
        return dataclasses.replace(self, factor=self.target_length / training_length)

    def rope_parameters(self, training_length: int) -> dict[str, Any]:
        """The `rope_parameters` entries transformers' init function for this type reads."""
        return {"rope_type": self.scaling, "factor": float(self.factor)}


@ROPE_SCALINGS.register("linear")
@dataclass(frozen=True)
class Linear(FactorScaling):
    """Position interpolation (Chen et al., 2023): every frequency divided by `factor`."""


@ROPE_SCALINGS.register("dynamic")
@dataclass(frozen=True)
class Dynamic(FactorScaling):
    """Dynamic NTK: the RoPE base grows with the input length past the training length."""

    length_dependent: ClassVar[bool] = True


@ROPE_SCALINGS.register("yarn")
@dataclass(frozen=True)
class Yarn(FactorScaling):
    """YaRN (Peng et al., 2023): per-frequency interpolation ramp between beta_slow and beta_fast, plus mscale."""

    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: transformers' default 0.1·ln(factor) + 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("rope", "beta_fast", self.beta_fast, greater_than=0)
        check_number("rope", "beta_slow", self.beta_slow, greater_than=0)
        if self.beta_fast <= self.beta_slow:
            raise RecipeError(
                f"rope.beta_fast ({self.beta_fast}) must be greater than rope.beta_slow ({self.beta_slow}); "
                "YaRN's defaults are 32 and 1."
            )
        if self.attention_factor is not None:
            check_number("rope", "attention_factor", self.attention_factor, greater_than=0)

    def rope_parameters(self, training_length: int) -> dict[str, Any]:
        params = {
            **super().rope_parameters(training_length),
            "original_max_position_embeddings": training_length,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        if self.attention_factor is not None:
            params["attention_factor"] = float(self.attention_factor)
        return params


@ROPE_SCALINGS.register("llama3")
@dataclass(frozen=True)
class Llama3(FactorScaling):
    """Llama 3.1's scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""

    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("rope", "low_freq_factor", self.low_freq_factor, greater_than=0)
        check_number("rope", "high_freq_factor", self.high_freq_factor, greater_than=0)
        if self.high_freq_factor <= self.low_freq_factor:
            raise RecipeError(
                f"rope.high_freq_factor ({self.high_freq_factor}) must be greater than rope.low_freq_factor "
                f"({self.low_freq_factor}); Llama 3.1 uses 4 and 1."
            )

    def rope_parameters(self, training_length: int) -> dict[str, Any]:
        return {
            **super().rope_parameters(training_length),
            "original_max_position_embeddings": training_length,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
        }


@ROPE_SCALINGS.register("longrope")
@dataclass(frozen=True)
class LongRope(FactorScaling):
    """LongRoPE (Ding et al., 2024): one rescale factor per frequency, `short_factor` within the training
    length and `long_factor` past it; `factor` sets the default attention factor."""

    length_dependent: ClassVar[bool] = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise RecipeError(
                    f"rope.{name} must be a list of numbers > 0, one per rotary frequency (head_dim / 2); "
                    f"got {value!r}."
                )
            for item in value:
                check_number("rope", name, item, greater_than=0)
            object.__setattr__(self, name, tuple(value))  # hashable, and equal whether read from YAML or code
        if len(self.short_factor) != len(self.long_factor):
            raise RecipeError(
                f"rope.short_factor has {len(self.short_factor)} values and rope.long_factor {len(self.long_factor)}; "
                "both need one per rotary frequency."
            )
        if self.attention_factor is not None:
            check_number("rope", "attention_factor", self.attention_factor, greater_than=0)

    def rope_parameters(self, training_length: int) -> dict[str, Any]:
        params = {
            **super().rope_parameters(training_length),
            "original_max_position_embeddings": training_length,
            "short_factor": list(self.short_factor),
            "long_factor": list(self.long_factor),
        }
        if self.attention_factor is not None:
            params["attention_factor"] = float(self.attention_factor)
        return params

    def install(self, structure: ModelStructure, dense: bool, log: PatchLog) -> ModelStructure:
        frequencies = {rotary.inv_freq.numel() for rotary in structure.rotaries}
        if frequencies != {len(self.short_factor)}:
            raise RecipeError(
                f"rope.short_factor and rope.long_factor have {len(self.short_factor)} values, but this model has "
                f"{' / '.join(map(str, sorted(frequencies)))} rotary frequencies per head (head_dim / 2)."
            )
        return super().install(structure, dense, log)


def _scaled_config(structure: ModelStructure, scaling: RebuiltRotary):
    """A copy of the decoder config whose rope_parameters ask for `scaling` on every non-sliding layer type."""
    config = copy.deepcopy(structure.config)
    params = copy.deepcopy(config.rope_parameters)
    new = scaling.rope_parameters(structure.training_length)
    kept = None if scaling.keeps_rope_type else ("rope_theta", "partial_rotary_factor")  # else: the base stays

    def updated(old: dict) -> dict:
        return {**{k: v for k, v in old.items() if kept is None or k in kept}, **new}

    nested = [key for key, value in params.items() if isinstance(value, dict)]
    if not nested:
        params = updated(params)
    else:
        # Sliding-window layers (Gemma3's local ones) never see distances past their window: keep them as trained.
        global_types = {config.layer_types[i] for i, window in enumerate(structure.sliding_windows) if window is None}
        targets = [key for key in nested if key in global_types]
        if not targets:
            raise UnsupportedModelError(
                f"every layer of this {config.model_type} model uses a sliding window, so rope.scaling "
                f"{scaling.scaling} has no long-range layer to extend."
            )
        for key in targets:
            params[key] = updated(params[key])
    config.rope_parameters = params
    return config


def _swap_rotary_state(structure: ModelStructure, scaling: RebuiltRotary, log: PatchLog) -> None:
    """Give the model's rotary module the buffers and attributes of the same class built for `scaling`."""
    module = structure.rotary_emb
    fresh = type(module)(_scaled_config(structure, scaling))
    reference = next(iter(module.buffers(recurse=False)))  # keep the device and dtype the model was put in
    saved_buffers, saved_non_persistent = dict(module._buffers), set(module._non_persistent_buffers_set)
    saved_attributes = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}

    def undo() -> None:
        module._buffers.clear()
        module._buffers.update(saved_buffers)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(saved_non_persistent)
        # dynamic and longrope add attributes while running (e.g. long_inv_freq): drop them too.
        for name in [k for k in vars(module) if not k.startswith("_") and k != "training"]:
            if name not in saved_attributes:
                delattr(module, name)
        for name, value in saved_attributes.items():
            setattr(module, name, value)

    log.on_undo(undo)
    for name, buffer in fresh.named_buffers(recurse=False):
        module.register_buffer(name, buffer.to(device=reference.device, dtype=reference.dtype), persistent=False)
    for name, value in vars(fresh).items():
        if not name.startswith("_") and name != "training":
            setattr(module, name, value)
