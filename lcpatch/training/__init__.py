"""The recipe's `training` section: what `lcpatch train` runs. Only validated dataclasses live here,
so that reading a recipe never imports a trainer; the training code is in `lcpatch.training.e2llm`
and `lcpatch.train`."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from ..errors import RecipeError
from ..fields import AUTO, check_bool, check_choice, check_int, check_keys, check_number, check_str

TRAINERS = ("hf", "trl")
DTYPES = ("auto", "float32", "bfloat16")


def _as_strings(section: str, name: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings, as a tuple (hashable, and equal whether read from YAML or code)."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise RecipeError(f"{section}.{name} must be a string or a list of strings; got {value!r}.")
    for item in items:
        check_str(section, name, item)
    return tuple(items)


@dataclass(frozen=True)
class LoraOptions:
    """A PEFT LoRA adapter on `target_modules`; `lora: null` in a recipe means a full fine-tune."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        check_int("training.lora", "r", self.r, minimum=1)
        check_int("training.lora", "alpha", self.alpha, minimum=1)
        check_number("training.lora", "dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"training.lora.dropout must be a number in [0, 1); got {self.dropout}.")
        object.__setattr__(self, "target_modules", _as_strings("training.lora", "target_modules", self.target_modules))


@dataclass(frozen=True)
class CausalLMTraining:
    """Plain next-token fine-tuning on text cut into `sequence_length`-token blocks, with the recipe's
    rope and attention sections applied (e.g. a position-interpolation baseline: rope linear)."""

    method: ClassVar[str] = "causal-lm"

    model: str | None = None  # a local folder or a Hugging Face Hub id
    data: tuple[str, ...] = ()  # text files, folders of .txt files, globs, or datasets names
    dataset_config: str | None = None
    text_field: str = "text"
    sequence_length: int | str = AUTO  # auto = the model's training length
    lora: LoraOptions | None = field(default_factory=LoraOptions)
    trainer: str = "hf"  # hf: transformers Trainer; trl: TRL SFTTrainer
    output_dir: str = "lcpatch-train-output"
    max_steps: int = 1000
    batch_size: int = 1  # per device
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2.0e-4
    warmup_steps: int = 10
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    gradient_checkpointing: bool = False
    logging_steps: int = 10

    def __post_init__(self) -> None:
        section = "training"
        check_str(section, "model", self.model, allow_none=True)
        object.__setattr__(self, "data", _as_strings(section, "data", self.data))
        check_str(section, "dataset_config", self.dataset_config, allow_none=True)
        check_str(section, "text_field", self.text_field)
        check_int(section, "sequence_length", self.sequence_length, minimum=2, allow_auto=True)
        if isinstance(self.lora, dict):
            check_keys("training.lora", self.lora, tuple(f.name for f in fields(LoraOptions)))
            object.__setattr__(self, "lora", LoraOptions(**self.lora))
        elif self.lora is not None and not isinstance(self.lora, LoraOptions):
            raise RecipeError(
                f"training.lora must be a mapping of LoRA options or null (full fine-tune); got {self.lora!r}."
            )
        check_choice(section, "trainer", self.trainer, TRAINERS)
        check_str(section, "output_dir", self.output_dir)
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps"):
            check_int(section, name, getattr(self, name), minimum=1)
        check_number(section, "learning_rate", self.learning_rate, greater_than=0)
        check_int(section, "warmup_steps", self.warmup_steps, minimum=0)
        check_int(section, "seed", self.seed, minimum=0)
        check_choice(section, "dtype", self.dtype, DTYPES)
        check_bool(section, "gradient_checkpointing", self.gradient_checkpointing)

    def resolve(self, training_length: int):
        if self.sequence_length != AUTO:
            return self
        return dataclasses.replace(self, sequence_length=training_length)


@dataclass(frozen=True)
class E2LLMTraining(CausalLMTraining):
    """E2-LLM (Liu et al., 2024): each training sequence sees RoPE at positions (m + t) / g, g drawn
    from {1..g_max}, t from [0, g·L - R] (L: the model's training length, R: `sequence_length`, by
    default L as in the paper), the first `sink_tokens` tokens keeping t = 0. Needs rope.scaling e2llm."""

    method: ClassVar[str] = "e2llm"

    g_max: int = 20  # the paper's default for a 4k model
    sink_tokens: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("training", "g_max", self.g_max, minimum=1)
        check_int("training", "sink_tokens", self.sink_tokens, minimum=0)


TrainingMethod = CausalLMTraining | E2LLMTraining

TRAINING_METHODS: dict[str, type] = {cls.method: cls for cls in (CausalLMTraining, E2LLMTraining)}


def training_from_dict(data: Any) -> TrainingMethod:
    """Build the training dataclass named by data['method'] from a recipe's `training` section."""
    if not isinstance(data, dict):
        raise RecipeError(f"the training section must be a mapping; got {data!r} ({type(data).__name__}).")
    method = data.get("method")
    if not isinstance(method, str) or method not in TRAINING_METHODS:
        raise RecipeError(f"unknown training.method {method!r}; accepted: {', '.join(TRAINING_METHODS)}.")
    cls = TRAINING_METHODS[method]
    check_keys("training", data, ("method", *(f.name for f in fields(cls))))
    return cls(**{k: v for k, v in data.items() if k != "method"})


def training_to_dict(training: TrainingMethod) -> dict:
    out = {"method": training.method, **asdict(training)}
    out["data"] = list(training.data)
    if training.lora is not None:
        out["lora"]["target_modules"] = list(training.lora.target_modules)
    return out


__all__ = [
    "CausalLMTraining",
    "E2LLMTraining",
    "LoraOptions",
    "TRAINING_METHODS",
    "TrainingMethod",
    "training_from_dict",
    "training_to_dict",
]
