"""Train as a recipe's `training` section says: `run(recipe)` loads the model, applies the recipe's rope and
attention sections, adds the LoRA adapter, runs the method's trainer and saves the weights (or adapter), the
tokenizer and lcpatch_recipe.yaml, so that `lcpatch.from_pretrained(folder)` rebuilds the inference setup.
`lcpatch train` (`lcpatch.cli.train`) is its command line."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from importlib import resources
from pathlib import Path

import torch

from .._compat import CHECKPOINTING_ARG, check_version
from ..api import apply, patched_recipe
from ..attention import Dense
from ..data.tokens import ensure_pad_token
from ..errors import RecipeError
from ..recipe import Recipe, RecipeLike, load_recipe
from ..serialization import RECIPE_FILE
from . import sequence_parallel
from .config import TRAINING_METHODS, CausalLMTraining

logger = logging.getLogger(__name__)

# The Accelerate launch configs shipped in recipes/accelerate/ (README, "Multi-GPU training").
ACCELERATE_CONFIGS = ("ddp", "fsdp2", "zero3", "zero3-ulysses")


def accelerate_config(name: str) -> Path:
    """The file of a shipped Accelerate config, for `accelerate launch --config_file FILE -m lcpatch.cli.train ...`."""
    if name not in ACCELERATE_CONFIGS:
        raise RecipeError(f"unknown Accelerate config {name!r}; shipped: {', '.join(ACCELERATE_CONFIGS)}.")
    return Path(str(resources.files("lcpatch.recipes") / "accelerate" / f"{name}.yaml"))


def with_overrides(spec: RecipeLike, overrides: dict) -> Recipe:
    """The recipe with the given training fields replaced (validated like the YAML file)."""
    recipe = load_recipe(spec)
    if recipe.training is None:
        raise RecipeError(
            f"recipe '{recipe.name or spec}' has no training section; use a training recipe such as the built-in "
            "'e2llm' (recipes/e2llm.yaml)."
        )
    training = TRAINING_METHODS.from_dict({**recipe.training.to_dict(), **overrides})
    return dataclasses.replace(recipe, training=training)


def training_packages(training: CausalLMTraining) -> list[str]:
    """The training libraries this run imports (each checked against lcpatch's supported range first)."""
    packages = ["accelerate"]
    if training.lora is not None:
        packages.append("peft")
    if training.trainer == "trl":  # also every preference method: their trainers subclass TRL's
        packages.append("trl")
    return packages


def _dtype(training: CausalLMTraining) -> torch.dtype:
    if training.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, training.dtype)


def _training_device() -> torch.device:
    """The device this process trains on: its local rank's GPU (where Accelerate puts the model), or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def run(recipe: RecipeLike) -> Path:
    """Train as `recipe.training` says; return the output folder (weights or adapter, tokenizer, recipe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(recipe)
    training = recipe.training
    if training is None or training.model is None:
        raise RecipeError(
            "lcpatch train needs training.model (a local folder or Hub id); set it in the recipe or with --model."
        )
    for package in training_packages(training):
        check_version(package)
    dtype = _dtype(training)
    tokenizer = AutoTokenizer.from_pretrained(training.model)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(training.model, dtype=dtype)
    attention = recipe.attention
    if isinstance(attention, Dense):  # the model is still on the CPU: decide for the device the trainer moves it to
        recipe = dataclasses.replace(recipe, attention=attention.for_device(model, _training_device()))
    apply(model, recipe)
    logger.info("training on attn_implementation %s", model.config.get_text_config()._attn_implementation)
    if sequence_parallel.configured_size() > 1:
        sequence_parallel.check_attention(model)  # Λ / InfLLM cannot attend over sequence shards
    resolved = patched_recipe(model)
    training = resolved.training
    if training.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = training.lora
        # PEFT trains no copy, and says nothing, for a modules_to_save name no module's path ends with.
        paths = [path for path, _ in model.named_modules()]
        unmatched = [name for name in lora.modules_to_save if not any(path.endswith(name) for path in paths)]
        if unmatched:
            raise RecipeError(
                f"training.lora.modules_to_save {unmatched} matches no module of this model, so nothing would be "
                "trained in full; give names its module paths end with (e.g. embed_tokens, norm)."
            )
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                modules_to_save=list(lora.modules_to_save) or None,
                # A trained copy of tied input embeddings must stay tied to the output head.
                ensure_weight_tying=bool(lora.modules_to_save) and model.config.get_text_config().tie_word_embeddings,
                task_type="CAUSAL_LM",
            ),
        )
    settings = dict(
        output_dir=training.output_dir,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        warmup_steps=training.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=training.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=training.seed,
        bf16=dtype == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        **{CHECKPOINTING_ARG: training.gradient_checkpointing},  # always: TRL's configs default it to on
    )
    trainer = training.trainer_builder()(training, model, tokenizer, settings)
    trainer.train()
    trainer.save_model(training.output_dir)
    output = Path(training.output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(output / "trainer_state.json"))
        if isinstance(attention, Dense):  # as written: `auto` is decided again wherever the trained model is loaded
            resolved = dataclasses.replace(resolved, attention=attention)
        (output / RECIPE_FILE).write_text(resolved.to_yaml())
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "no process group"
        logger.info(
            "trained %d steps on %d processes (%s); saved to %s",
            trainer.state.global_step,
            trainer.args.world_size,
            backend,
            output,
        )
    return output


def end_process_group() -> None:
    """Tear down the process group the Trainer started, once every rank is done.

    A torchrun rank that exits with a live gloo group can abort in the group's destructor ("terminate called
    without an active exception", SIGABRT) while rank 0 is still saving, and the launcher then fails the run.
    Only the command line calls this: a caller of `run()` owns its own process group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if sys.exc_info()[0] is None:  # after a failure the other ranks may never reach a barrier
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
