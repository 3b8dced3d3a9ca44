"""LongPO's trainer (Chen et al., 2025, arXiv 2502.13922) as a subclass of TRL's DPOTrainer.

The short-to-long log-ratio of an answer y is log π(y | long prompt) - log π_ref(y | short prompt):
the policy reads the whole long document, the reference only the chunk the instruction was written
from. The loss is NLL(chosen | long prompt) + λ · DPO_β on those ratios, i.e. TRL's loss types
["sft", "sigmoid"] weighted [1, λ], so TRL computes the loss and logs its metrics (rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/...). What LongPO changes:

- `_prepare_dataset`: the long prompt is TRL's `prompt`; the short prompt is tokenised next to it;
- the collator builds the usual [chosen; rejected] batch on the long prompt plus a `short_*` one;
- `compute_ref_log_probs` scores the short batch with TRL's reference (a frozen copy of the model, or
  for a LoRA run TRL's frozen copy of the starting adapter), also when TRL precomputes them once;
- `_compute_loss` puts the reference log-probs into the batch, where TRL's loss reads them;
- `train` runs the recipe's stages one after the other, each with its own RoPE scaling.
"""

from __future__ import annotations

import dataclasses
import logging

from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ..api import apply, patched_recipe, remove
from ..data.longpo import build_pairs, load_pairs, prompt_ids
from ..data.tokens import ensure_pad_token
from ..errors import RecipeError
from ..models.structure import training_length, unwrap
from ..recipe import Recipe
from . import sequence_parallel
from .config import LongPOStage, LongPOTraining

logger = logging.getLogger(__name__)

# The short (reference) batch travels under these names next to TRL's own keys.
SHORT = "short_"
BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclasses.dataclass
class LongShortCollator:
    """TRL's preference batch on the long prompt, plus the same answers after the short prompt (`short_*`)."""

    long: DataCollatorForPreference
    short: DataCollatorForPreference

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.long(examples)
        short = self.short([{**e, "prompt_ids": e["short_prompt_ids"]} for e in examples])
        batch.update({SHORT + key: short[key] for key in BATCH_KEYS})
        return batch


def _short_batch(inputs: dict) -> dict:
    return {key: inputs[SHORT + key] for key in BATCH_KEYS}


class LongPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with LongPO's short-to-long reference and loss; pairs need `prompt_long`,
    `prompt_short`, `chosen`, `rejected` (and, for precomputed references, may carry `ref_*_logps`)."""

    def __init__(self, model, ref_model=None, *, args: DPOConfig, processing_class, stages=(), **kwargs):
        ensure_pad_token(processing_class)
        # Given to TRL's __init__, which already collates batches when it precomputes reference log-probs.
        long = DataCollatorForPreference(
            pad_token_id=processing_class.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )
        collator = LongShortCollator(long, dataclasses.replace(long, max_length=None))  # short prompts fit
        self.stages: tuple[LongPOStage, ...] = tuple(stages)
        if sequence_parallel.uses_deepspeed():
            raise RecipeError(
                "LongPO does not run under DeepSpeed's Ulysses data loader (accelerate parallelism_config sp_size > 1): "
                "it cuts every batch tensor to the long rows' length, and the short-prompt reference rows are "
                "shorter. Use recipes/accelerate/zero3.yaml, or lcpatch's sequence parallelism "
                "(lcpatch.training.sequence_parallel.enable) in your own launcher."
            )
        super().__init__(
            model, ref_model, args=args, data_collator=collator, processing_class=processing_class, **kwargs
        )
        # The reference log-probs are always in the batch when TRL's loss runs (put there by `_compute_loss`
        # from the short prompt, or precomputed), so TRL never runs its own reference forward on the long one.
        self.precompute_ref_logps = True

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:  # already tokenised (evaluate() passes prepared sets again)
            return dataset
        tokenizer = self._tokenizer

        def short_ids(example):
            return {"short_prompt_ids": prompt_ids(tokenizer, example["prompt_short"])}

        dataset = dataset.map(short_ids, desc=f"Tokenizing the short prompts of {dataset_name} dataset")
        dataset = dataset.rename_column("prompt_long", "prompt").remove_columns("prompt_short")
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if len(dataset) and not len(prepared):  # TRL drops rows whose prompt alone fills max_length
            raise RecipeError(
                f"every long prompt of the {dataset_name} pairs has at least {args.max_length} tokens "
                "(training.sequence_length): no answer would be trained. Raise it, or set it to auto (no cap)."
            )
        return prepared

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "short_prompt_ids" not in self._signature_columns:
            self._signature_columns.append("short_prompt_ids")

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if all(column in dataset.column_names for column in REF_COLUMNS):
            return dataset  # precomputed elsewhere (e.g. with the model the pairs were built with)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(sequence_parallel.sharded(model), _short_batch(inputs))

    def _compute_loss(self, model, inputs, return_outputs):
        long_inputs = {key: value for key, value in inputs.items() if not key.startswith(SHORT)}
        if REF_COLUMNS[0] not in long_inputs:
            chosen, rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
            long_inputs.update(zip(REF_COLUMNS, (chosen, rejected), strict=True))
        # Under sequence parallelism TRL sees whole rows; the wrapper runs this rank's shard and gathers the
        # per-token log-probs back, so the DPO and NLL terms read whole-sequence sums.
        return super()._compute_loss(sequence_parallel.sharded(model), long_inputs, return_outputs)

    def train(self, *args, **kwargs):
        """One run, or one per stage: each re-patches the model with its RoPE scaling and trains its steps
        with a fresh optimizer and schedule (the paper's iterations); the log history spans all stages."""
        if not self.stages:
            return super().train(*args, **kwargs)
        history, steps, output, default_steps = [], 0, None, self.args.max_steps
        for number, stage in enumerate(self.stages, start=1):
            _patch_stage(self.model, stage)
            self.args.max_steps = stage.max_steps or default_steps
            self.optimizer, self.lr_scheduler = None, None
            logger.info(
                "LongPO stage %d/%d: rope %s, %d steps", number, len(self.stages), stage.rope, self.args.max_steps
            )
            output = super().train(*args, **kwargs)
            history += [
                {**entry, "stage": number, "step": entry.get("step", 0) + steps} for entry in self.state.log_history
            ]
            steps += self.state.global_step
        self.state.log_history, self.state.global_step = history, steps
        return output


def _patch_stage(model, stage: LongPOStage) -> None:
    """Re-patch the model with the recipe it carries, its rope section replaced by the stage's."""
    recipe = patched_recipe(model) or Recipe()
    if patched_recipe(model) is not None:
        remove(model)
    apply(model, dataclasses.replace(recipe, rope=stage.rope))


def frozen_copy(model):
    """A frozen copy of a (patched) model, patched the same way: the full fine-tune's reference."""
    base = unwrap(model)
    copy = type(base)(base.config).to(dtype=base.dtype, device=base.device)
    copy.load_state_dict(base.state_dict())
    recipe = patched_recipe(base)
    if recipe is not None:
        apply(copy, recipe)
    return copy.eval().requires_grad_(False)


def _check_stages(training: LongPOTraining, model) -> None:
    recipe = patched_recipe(model)
    if not training.stages or recipe is None:
        return
    last = training.stages[-1].rope.resolve(training_length(unwrap(model).config))
    if last != recipe.rope:
        raise RecipeError(
            f"the last of training.stages trains rope {last}, but the recipe's rope section (what the trained model "
            f"is saved and loaded with) is {recipe.rope}; make the last stage's rope the recipe's rope section."
        )


def build_trainer(training: LongPOTraining, model, tokenizer, settings: dict) -> LongPOTrainer:
    """`lcpatch train`'s LongPO trainer: the recipe's pairs, β, λ, reference and stages on TRL's DPOConfig."""
    from peft import PeftModel

    _check_stages(training, model)
    precomputed = training.reference == "precomputed"
    args = DPOConfig(
        **settings,
        beta=training.beta,
        loss_type=["sft", "sigmoid"],
        loss_weights=[1.0, training.dpo_weight],
        max_length=None if training.sequence_length == "auto" else training.sequence_length,
        precompute_ref_log_probs=precomputed,
    )
    # Without LoRA the reference is a frozen copy (TRL would reload it from the hub id, unpatched); with LoRA,
    # TRL scores it with a frozen copy of the starting adapter (a fresh adapter is zero: the base model, adapter
    # off); with precomputed log-probs none is kept.
    reference = None if precomputed or isinstance(model, PeftModel) else frozen_copy(model)
    return LongPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=load_pairs(training.data, training.dataset_config),
        processing_class=tokenizer,
        stages=training.stages,
    )


__all__ = ["LongPOTrainer", "LongShortCollator", "build_pairs", "build_trainer", "frozen_copy", "load_pairs"]
