"""The recipe's `training` section: what `lcpatch train` runs, one validated dataclass per method, filed in
`TRAINING_METHODS` under its `method` name. Reading a recipe imports no trainer: each method's
`trainer_builder()` imports the code that trains it (`causal_lm`, `longpo`, `logo`) only when it runs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import RecipeError
from ..fields import (
    AUTO,
    ROPE_SCALINGS,
    TRAINING_METHODS,
    SectionConfig,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
)

if TYPE_CHECKING:  # reading the training section (e.g. `lcpatch train --help`) must not import torch
    from ..rope import RopeScaling

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


def check_g_weights(g_weights: tuple[float, ...], g_max: int) -> None:
    """Relative weights of g = 1..g_max: none (uniform), or g_max finite, non-negative numbers, not all zero."""
    if not g_weights:
        return
    if len(g_weights) != g_max or any(not isinstance(w, (int, float)) or isinstance(w, bool) for w in g_weights):
        raise RecipeError(
            f"training.g_weights must be {g_max} numbers (g_max = {g_max}), the relative weight of g = 1..{g_max}; "
            f"got {list(g_weights)!r}. Leave it empty for uniform draws."
        )
    if not all(math.isfinite(w) for w in g_weights) or min(g_weights) < 0 or sum(g_weights) <= 0:
        raise RecipeError(f"training.g_weights must be finite, non-negative and not all zero; got {list(g_weights)!r}.")


def check_plain_position_share(share: float) -> None:
    """LOGO's share of row uses read at plain positions: a number in [0, 1]."""
    check_number("training", "plain_position_share", share)
    if not 0 <= share <= 1:
        raise RecipeError(
            f"training.plain_position_share must be a number in [0, 1] (the share of row uses read at plain "
            f"positions); got {share}."
        )


@dataclass(frozen=True)
class LoraOptions(SectionConfig):
    """A PEFT LoRA adapter on `target_modules`; `lora: null` in a recipe means a full fine-tune."""

    section: ClassVar[str] = "training.lora"

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # Modules trained in full next to the adapter (PEFT matches names by suffix: "norm" takes every *norm).
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_int("training.lora", "r", self.r, minimum=1)
        check_int("training.lora", "alpha", self.alpha, minimum=1)
        check_number("training.lora", "dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"training.lora.dropout must be a number in [0, 1); got {self.dropout}.")
        object.__setattr__(self, "target_modules", _as_strings("training.lora", "target_modules", self.target_modules))
        object.__setattr__(
            self, "modules_to_save", _as_strings("training.lora", "modules_to_save", self.modules_to_save)
        )


@TRAINING_METHODS.register("causal-lm")
@dataclass(frozen=True)
class CausalLMTraining(SectionConfig):
    """Plain next-token fine-tuning on text cut into `sequence_length`-token blocks, with the recipe's
    rope and attention sections applied (e.g. a position-interpolation baseline: rope linear)."""

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
            object.__setattr__(self, "lora", LoraOptions.from_dict(self.lora))
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

    @staticmethod
    def trainer_builder() -> Callable:
        """The function (training, model, tokenizer, settings) -> Trainer that `lcpatch train` runs this method with."""
        from .causal_lm import language_model_trainer

        return language_model_trainer


@TRAINING_METHODS.register("e2llm")
@dataclass(frozen=True)
class E2LLMTraining(CausalLMTraining):
    """E2-LLM (Liu et al., 2024): each training sequence sees RoPE at positions (m + t) / g, g drawn
    from {1..g_max}, t from [0, g·L - R] (L: the model's training length, R: `sequence_length`, by
    default L as in the paper), the first `sink_tokens` tokens keeping t = 0. Needs rope.scaling e2llm.
    `g_weights`: the relative weight of each g (empty: uniform), e.g. more of g = 1 to keep the training length."""

    g_max: int = 20  # the paper's default for a 4k model
    sink_tokens: int = 4
    g_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("training", "g_max", self.g_max, minimum=1)
        check_int("training", "sink_tokens", self.sink_tokens, minimum=0)
        weights = self.g_weights
        if not isinstance(weights, (list, tuple)):
            raise RecipeError(f"training.g_weights must be a list of numbers (empty: uniform); got {weights!r}.")
        check_g_weights(tuple(weights), self.g_max)
        object.__setattr__(self, "g_weights", tuple(weights))


LONGPO_REFERENCES = ("model", "precomputed")


@dataclass(frozen=True)
class LongPOStage(SectionConfig):
    """One LongPO iteration (the paper's 128K -> 256K -> 512K): `max_steps` steps with this RoPE scaling."""

    section: ClassVar[str] = "training.stages[]"

    rope: RopeScaling
    max_steps: int | None = None  # None: training.max_steps

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            from .. import rope  # noqa: F401  (files the scalings in ROPE_SCALINGS)

            object.__setattr__(self, "rope", ROPE_SCALINGS.from_dict(self.rope))
        elif not hasattr(self.rope, "scaling"):
            raise RecipeError(
                f"training.stages[].rope must be a rope section (e.g. {{scaling: yarn, factor: 4}}); got {self.rope!r}."
            )
        if self.max_steps is not None:
            check_int("training.stages[]", "max_steps", self.max_steps, minimum=1)


@dataclass(frozen=True)
class TRLTraining(CausalLMTraining):
    """A method whose trainer subclasses one of TRL's (named by `trl_trainer`): `trainer` can only be trl."""

    trl_trainer: ClassVar[str]

    trainer: str = "trl"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trainer != "trl":
            raise RecipeError(
                f"training.trainer must be trl for training.method {self.method} (it subclasses TRL's "
                f"{self.trl_trainer}); got {self.trainer!r}."
            )


@TRAINING_METHODS.register("longpo")
@dataclass(frozen=True)
class LongPOTraining(TRLTraining):
    """LongPO (Chen et al., 2025, arXiv 2502.13922) on TRL's DPOTrainer: pairs from `lcpatch data longpo`
    (`data`: their folder, JSONL files or a datasets name); loss NLL(chosen | long prompt) + dpo_weight ·
    DPO_beta, whose log-ratios put the policy on the long prompt and the reference on the short one.
    `sequence_length` caps the policy's sequence (long prompt + answer; `auto`: no cap, pairs as built)."""

    trl_trainer: ClassVar[str] = "DPOTrainer"

    beta: float = 0.01  # β of the DPO term (the paper's default)
    dpo_weight: float = 0.01  # λ: loss = NLL(chosen | long) + λ · DPO_β (the paper's default)
    reference: str = "model"  # model: the frozen start (LoRA: adapter off); precomputed: once before training
    stages: tuple[LongPOStage, ...] = ()  # empty: one run with the recipe's rope section

    def __post_init__(self) -> None:
        super().__post_init__()
        section = "training"
        check_number(section, "beta", self.beta, greater_than=0)
        check_number(section, "dpo_weight", self.dpo_weight, greater_than=0)
        check_choice(section, "reference", self.reference, LONGPO_REFERENCES)
        if not isinstance(self.stages, (list, tuple)):
            raise RecipeError(
                f"training.stages must be a list of {{rope: ..., max_steps: ...}} mappings (or []); got {self.stages!r}."
            )
        stages = []
        for stage in self.stages:
            if isinstance(stage, dict):
                stage = LongPOStage.from_dict(stage)
            elif not isinstance(stage, LongPOStage):
                raise RecipeError(
                    f"each training.stages entry must be a mapping {{rope: ..., max_steps: ...}}; got {stage!r}."
                )
            stages.append(stage)
        object.__setattr__(self, "stages", tuple(stages))

    def resolve(self, training_length: int):
        return self  # `auto` sequence_length means no cap: long prompts are longer than the training length by design

    @staticmethod
    def trainer_builder() -> Callable:
        from .longpo import build_trainer

        return build_trainer


@TRAINING_METHODS.register("logo")
@dataclass(frozen=True)
class LOGOTraining(TRLTraining):
    """LOGO (Tang et al., 2024, arXiv 2410.18533) on TRL's CPOTrainer: rows from `lcpatch data logo`
    (`data`: JSONL files or folders of them); loss −log σ(β·[r(chosen) − mean_j r(rejected_j) − γ/β])
    + sft_weight · CE(chosen), r = mean token log-prob. Each row's real context (at most `real_length`
    tokens with its question and answers) is read at positions spread over `virtual_length`
    (`lcpatch.training.positions`). `sequence_length` and `text_field` are not used."""

    trl_trainer: ClassVar[str] = "CPOTrainer"

    # The paper's adapter: r = 32, α = 16, embeddings and norms trained in full.
    lora: LoraOptions | None = field(
        default_factory=lambda: LoraOptions(r=32, alpha=16, modules_to_save=("embed_tokens", "norm"))
    )
    learning_rate: float = 5.0e-5
    beta: float = 10.0  # β (the paper's Llama-3-8B value)
    gamma_over_beta: float = 0.3  # γ/β, the reward margin
    sft_weight: float = 0.1  # λ_sft, weight of CE(chosen)
    num_rejected: int = 2  # M dis-preferred answers per row
    chunk_size: int = 512  # tokens per context chunk: each chunk gets its own span of the virtual range
    real_length: int | str = AUTO  # tokens per training sequence; auto = the model's training length
    virtual_length: int = 65536  # the position range the real context is spread over
    offsets_per_example: int | str = AUTO  # layouts drawn from per row; auto = the fewest that cover each span
    plain_position_share: float = 0.0  # share of a row's uses read at its plain positions 0..n-1, not synthesised

    def __post_init__(self) -> None:
        super().__post_init__()
        section = "training"
        check_number(section, "beta", self.beta, greater_than=0)
        check_plain_position_share(self.plain_position_share)
        for name in ("gamma_over_beta", "sft_weight"):
            check_number(section, name, getattr(self, name))
            if getattr(self, name) < 0:
                raise RecipeError(f"training.{name} must be a number >= 0; got {getattr(self, name)}.")
        check_int(section, "num_rejected", self.num_rejected, minimum=1)
        check_int(section, "chunk_size", self.chunk_size, minimum=1)
        check_int(section, "real_length", self.real_length, minimum=2, allow_auto=True)
        check_int(section, "virtual_length", self.virtual_length, minimum=2)
        check_int(section, "offsets_per_example", self.offsets_per_example, minimum=1, allow_auto=True)
        if self.real_length != AUTO and self.virtual_length < self.real_length:
            raise RecipeError(
                f"training.virtual_length must be >= training.real_length ({self.real_length}); "
                f"got {self.virtual_length}."
            )

    def resolve(self, training_length: int):
        if self.real_length != AUTO:
            return self
        return dataclasses.replace(self, real_length=training_length)

    @staticmethod
    def trainer_builder() -> Callable:
        from .logo import build_trainer

        return build_trainer


TrainingMethod = CausalLMTraining | E2LLMTraining | LongPOTraining | LOGOTraining
