"""Fine-tune a causal LM as a recipe's `training` section says (E2-LLM, LongPO, LOGO, or a plain causal-LM baseline).

    lcpatch train e2llm --model HuggingFaceTB/SmolLM2-135M --data "books/*.txt" --max-steps 200
    python -m lcpatch.train my-recipe.yaml --sequence-length 2048 --g-max 8
    accelerate launch --config_file $(lcpatch train --accelerate-config fsdp2) -m lcpatch.train e2llm ...
    accelerate launch --num_processes 2 -m lcpatch.train e2llm --output-dir out ...
    (on a CPU-only machine add --multi_gpu: accelerate's --cpu starts one process unless mpirun is set up;
    --multi_gpu without GPUs starts torchrun processes that train on CPU over gloo)

Every field of the training section is also a flag, its value read as YAML (`--lora null` for a
full fine-tune, `--data '[a.txt, b.txt]'`). The recipe's rope and attention sections are applied
to the model before training. The output folder holds the weights (or the LoRA adapter), the
tokenizer and lcpatch_recipe.yaml: `lcpatch.from_pretrained(folder)` rebuilds the inference setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import logging
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import yaml

from ._compat import CHECKPOINTING_ARG, check_version
from .api import apply, patched_recipe
from .data import load_texts
from .errors import RecipeError
from .recipe import Recipe, RecipeLike, load_recipe
from .serialization import RECIPE_FILE
from .training import TRAINING_METHODS, CausalLMTraining, sequence_parallel, training_from_dict, training_to_dict

logger = logging.getLogger(__name__)


def _flag_value(text: str):
    """A flag's value: a number when it reads as one (YAML 1.1 would keep '2e-4' a string), else YAML."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


# One flag per field of any training method; a flag the recipe's method lacks is rejected like a YAML typo.
FIELDS = tuple(dict.fromkeys(f.name for cls in TRAINING_METHODS.values() for f in dataclasses.fields(cls)))


# The Accelerate launch configs shipped in recipes/accelerate/ (README, "Multi-GPU training").
ACCELERATE_CONFIGS = ("ddp", "fsdp2", "zero3", "zero3-ulysses")


def accelerate_config(name: str) -> Path:
    """The file of a shipped Accelerate config, for `accelerate launch --config_file FILE -m lcpatch.train ...`."""
    if name not in ACCELERATE_CONFIGS:
        raise RecipeError(f"unknown Accelerate config {name!r}; shipped: {', '.join(ACCELERATE_CONFIGS)}.")
    return Path(str(resources.files("lcpatch.recipes") / "accelerate" / f"{name}.yaml"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe", nargs="?", help="a recipe with a training section: built-in name (e2llm) or YAML file"
    )
    parser.add_argument(
        "--accelerate-config",
        metavar="NAME",
        choices=ACCELERATE_CONFIGS,
        default=argparse.SUPPRESS,  # like the field flags: absent from the parsed namespace unless given
        help="print the path of a shipped Accelerate config and exit: "
        "accelerate launch --config_file $(lcpatch train --accelerate-config fsdp2) -m lcpatch.train RECIPE ...",
    )
    for name in FIELDS:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar="VALUE",
            type=_flag_value,
            default=argparse.SUPPRESS,
            help=f"overrides training.{name} (read as YAML)",
        )


def with_overrides(spec: RecipeLike, overrides: dict) -> Recipe:
    """The recipe with the given training fields replaced (validated like the YAML file)."""
    recipe = load_recipe(spec)
    if recipe.training is None:
        raise RecipeError(
            f"recipe '{recipe.name or spec}' has no training section; use a training recipe such as the built-in "
            "'e2llm' (recipes/e2llm.yaml)."
        )
    training = training_from_dict({**training_to_dict(recipe.training), **overrides})
    return dataclasses.replace(recipe, training=training)


def _blocks(texts: list[str], tokenizer, length: int) -> list[dict]:
    """Documents tokenised, joined with EOS and cut into rows of `length` tokens (the remainder dropped)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(row + eos for row in ids), dtype=np.int64))
    if flat.numel() < length:
        raise RecipeError(f"training.data holds {flat.numel()} tokens, fewer than training.sequence_length = {length}.")
    return [{"input_ids": row} for row in flat[: flat.numel() // length * length].view(-1, length)]


def _next_token_batch(rows: list[dict]) -> dict:
    ids = torch.stack([row["input_ids"] for row in rows])
    batch = {"input_ids": ids, "labels": ids.clone()}
    if sequence_parallel.configured_size() > 1:  # DeepSpeed's Ulysses loader keeps them global when it cuts rows
        batch["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids)
    return batch


def language_model_trainer(training: CausalLMTraining, model, tokenizer, settings: dict):
    """Next-token training on the documents cut into `sequence_length` blocks (causal-lm and e2llm)."""
    from transformers import Trainer, TrainingArguments

    callbacks = []
    if training.method == "e2llm":
        from .training.e2llm import E2LLMCallback

        callbacks.append(E2LLMCallback(training.g_max, training.sink_tokens))
    if training.sequence_length % sequence_parallel.configured_size():
        raise RecipeError(
            f"training.sequence_length {training.sequence_length} must be a multiple of the sequence-parallel size "
            f"{sequence_parallel.configured_size()} (every rank of the group holds an equal shard of each row)."
        )
    texts = load_texts(training.data, training.dataset_config, training.text_field)
    if training.trainer == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # "wrapped" packing cuts the token stream into equal blocks, as the hf path does.
        args = SFTConfig(
            **settings,
            max_length=training.sequence_length,
            packing=True,
            packing_strategy="wrapped",
            dataset_text_field="text",
        )
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=_blocks(texts, tokenizer, training.sequence_length),
        data_collator=_next_token_batch,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


# Each training method's trainer, as "module:function(training, model, tokenizer, settings) -> Trainer",
# imported only when that method runs (reading a recipe imports no trainer library).
TRAINER_BUILDERS = {
    "causal-lm": "lcpatch.train:language_model_trainer",
    "e2llm": "lcpatch.train:language_model_trainer",
    "logo": "lcpatch.training.logo:build_trainer",
    "longpo": "lcpatch.training.longpo:build_trainer",
}


def training_packages(training: CausalLMTraining) -> list[str]:
    """The training libraries this run imports (each checked against lcpatch's supported range first)."""
    packages = ["accelerate"]
    if training.lora is not None:
        packages.append("peft")
    if getattr(training, "trainer", "hf") == "trl" or not TRAINER_BUILDERS[training.method].startswith(__name__):
        packages.append("trl")  # the preference trainers subclass TRL's
    return packages


def _dtype(training: CausalLMTraining) -> torch.dtype:
    if training.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, training.dtype)


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
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(training.model, dtype=dtype)
    apply(model, recipe)
    if sequence_parallel.configured_size() > 1:
        sequence_parallel.check_attention(model)  # Λ / InfLLM cannot attend over sequence shards
    resolved = patched_recipe(model)
    training = resolved.training
    if training.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = training.lora
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
    module, name = TRAINER_BUILDERS[training.method].split(":")
    trainer = getattr(importlib.import_module(module), name)(training, model, tokenizer, settings)
    trainer.train()
    trainer.save_model(training.output_dir)
    output = Path(training.output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(output / "trainer_state.json"))
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


def run_cli(args: argparse.Namespace) -> int:
    if hasattr(args, "accelerate_config"):
        print(accelerate_config(args.accelerate_config))
        return 0
    if args.recipe is None:
        raise RecipeError("lcpatch train needs a recipe (e.g. `lcpatch train e2llm --model ...`).")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    try:
        run(with_overrides(args.recipe, overrides))
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Tear down the process group the Trainer started, once every rank is done.

    A torchrun rank that exits with a live gloo group can abort in the group's destructor ("terminate called
    without an active exception", SIGABRT) while rank 0 is still saving, and the launcher then fails the run.
    Only the command line does this: a caller of `run()` owns its own process group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if sys.exc_info()[0] is None:  # after a failure the other ranks may never reach a barrier
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lcpatch.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
