"""Fine-tuning for long context. The recipe's `training` section is read from `config` (light: no trainer
library); what runs it is imported only to train: `runner` (`run`, what `lcpatch train` calls), the trainers
(`causal_lm` for causal-lm and e2llm, `longpo`, `logo`) and their parts (`e2llm`, `positions`,
`sequence_parallel`)."""

from .config import (
    TRAINING_METHODS,
    CausalLMTraining,
    E2LLMTraining,
    LOGOTraining,
    LongPOStage,
    LongPOTraining,
    LoraOptions,
    TrainingMethod,
)

__all__ = [
    "CausalLMTraining",
    "E2LLMTraining",
    "LOGOTraining",
    "LoraOptions",
    "LongPOStage",
    "LongPOTraining",
    "TRAINING_METHODS",
    "TrainingMethod",
]
