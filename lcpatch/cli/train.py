"""Fine-tune a causal LM as a recipe's `training` section says (E2-LLM, LongPO, LOGO, or a plain causal-LM baseline).

    lcpatch train e2llm --model HuggingFaceTB/SmolLM2-135M --data "books/*.txt" --max-steps 200
    lcpatch train my-recipe.yaml --sequence-length 2048 --g-max 8    (python -m lcpatch.cli.train: the same)
    accelerate launch --config_file $(lcpatch train --accelerate-config fsdp2) -m lcpatch.cli.train e2llm ...
    accelerate launch --num_processes 2 -m lcpatch.cli.train e2llm --output-dir out ...
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
import logging
import sys
from importlib import resources

import yaml

from ..errors import RecipeError, run_reporting_errors
from ..training import TRAINING_METHODS


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

# What each flag sets, for --help (its default is read from the recipes).
MEANINGS = {
    "model": "the model to fine-tune: a local folder or a Hugging Face Hub id",
    "data": "training data: text files, folders of .txt files, globs or a datasets name (longpo: the pairs of "
    "`lcpatch data longpo`; logo: the JSONL rows of `lcpatch data logo`)",
    "dataset_config": "with a datasets name in --data: its configuration",
    "text_field": "with a datasets name in --data: the text column",
    "sequence_length": "tokens per training sequence; auto = the model's training length (longpo: a cap on the "
    "long prompt + answer, auto = none)",
    "lora": "the LoRA adapter, a mapping of r, alpha, dropout, target_modules, modules_to_save; null: a full fine-tune",
    "trainer": "hf (transformers Trainer) or trl (TRL's trainer; the only one for longpo and logo)",
    "output_dir": "folder for the weights (or adapter), the tokenizer and lcpatch_recipe.yaml",
    "max_steps": "optimizer steps",
    "batch_size": "sequences (or rows) per device per step",
    "gradient_accumulation_steps": "steps whose gradients add up before each optimizer step",
    "learning_rate": "peak learning rate",
    "warmup_steps": "steps of learning-rate warm-up",
    "seed": "random seed",
    "dtype": "auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16",
    "gradient_checkpointing": "true: recompute activations in the backward pass (less memory, slower)",
    "logging_steps": "log every N steps",
    "g_max": "the position scale g is drawn from 1..g_max",
    "g_weights": "relative weight of each g = 1..g_max, a list of g_max numbers ([]: uniform)",
    "sink_tokens": "first tokens of a sequence whose position offset stays 0",
    "beta": "β: of the DPO term (longpo), of the reward (logo)",
    "dpo_weight": "λ in the loss NLL(chosen | long prompt) + λ · DPO",
    "reference": "model (the frozen start scores the short prompt each step) or precomputed (once, before training)",
    "stages": "LongPO's iterations, a list of {rope: ..., max_steps: ...}; []: one run with the recipe's rope",
    "gamma_over_beta": "γ/β, the reward margin",
    "sft_weight": "weight of the preferred answer's cross-entropy",
    "num_rejected": "dis-preferred answers per row",
    "chunk_size": "tokens per context chunk; each chunk gets its own span of the virtual range",
    "real_length": "tokens per sequence; auto = the model's training length",
    "virtual_length": "the position range the real context is spread over",
    "offsets_per_example": "layouts a row is drawn at; auto = the fewest that cover every span",
    "plain_position_share": "share of a row's uses read at its plain positions 0..n-1 instead of a synthesised layout",
}


def _yaml_text(value) -> str:
    if dataclasses.is_dataclass(value):
        value = value.to_dict()
    if isinstance(value, tuple):
        value = list(value)
    return (
        yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6, allow_unicode=True)
        .removesuffix("\n...\n")
        .strip()
    )


def builtin_training_recipes() -> dict[str, dict]:
    """The training section of each built-in recipe that has one, by recipe name, read from its YAML file (no
    torch: `lcpatch train --help` lists them)."""
    found = {}
    for path in sorted(resources.files("lcpatch.recipes").iterdir(), key=lambda p: p.name):
        if path.name.endswith(".yaml"):
            training = (yaml.safe_load(path.read_text()) or {}).get("training")
            if training:
                found[path.name.removesuffix(".yaml")] = training
    return found


def _accelerate_configs() -> list[str]:
    folder = resources.files("lcpatch.recipes") / "accelerate"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _default(name: str, recipes: dict[str, dict]) -> str:
    """A flag's default: its value in each built-in recipe whose method has the field (the YAML's, else the
    method's default), 'default V' when they agree; the methods that have it when not all do."""
    values = {}
    for recipe, training in recipes.items():
        method = TRAINING_METHODS[training.get("method", TRAINING_METHODS.default)]
        declared = {f.name: f for f in dataclasses.fields(method)}
        if name not in declared:
            continue
        if name in training:
            values[recipe] = training[name]
        else:
            field = declared[name]
            values[recipe] = (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            )
    owners = [method for method, cls in TRAINING_METHODS.items() if name in {f.name for f in dataclasses.fields(cls)}]
    scope = "" if len(owners) == len(TRAINING_METHODS) else f"{', '.join(owners)} only; "
    shown = {recipe: _yaml_text(value) for recipe, value in values.items()}
    if len(set(shown.values())) == 1:
        return f"{scope}default {next(iter(shown.values()))}"
    return scope + "default: " + "; ".join(f"{recipe} {text}" for recipe, text in shown.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipes = builtin_training_recipes()
    names = ", ".join(recipes)
    parser.description = (parser.description or "") + (
        f"\nBuilt-in training recipes: {names} (recipes/NAME.yaml).\nA flag's default is the recipe's value; "
        "the defaults below are the built-in recipes' values\n(a field that a YAML recipe leaves out gets its "
        "method's default)."
    )
    parser.add_argument(
        "recipe", nargs="?", help=f"a recipe with a training section: a built-in name ({names}) or a YAML file"
    )
    parser.add_argument(
        "--accelerate-config",
        metavar="NAME",
        choices=_accelerate_configs(),
        default=argparse.SUPPRESS,  # like the field flags: absent from the parsed namespace unless given
        help=f"print the path of a shipped Accelerate config ({', '.join(_accelerate_configs())}) and exit: "
        "accelerate launch --config_file $(lcpatch train --accelerate-config fsdp2) -m lcpatch.cli.train RECIPE ...",
    )
    for name in FIELDS:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar="VALUE",
            type=_flag_value,
            default=argparse.SUPPRESS,
            help=f"{MEANINGS[name]} ({_default(name, recipes)})",
        )


def _train(args: argparse.Namespace) -> None:
    # Imported here: `lcpatch train --help` must not load torch.
    from ..training.runner import accelerate_config, end_process_group, run, with_overrides

    if hasattr(args, "accelerate_config"):
        print(accelerate_config(args.accelerate_config))
        return
    if args.recipe is None:
        raise RecipeError("lcpatch train needs a recipe (e.g. `lcpatch train e2llm --model ...`).")
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    try:
        run(with_overrides(args.recipe, overrides))
    finally:
        end_process_group()


def run_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return run_reporting_errors(_train, args)


def main(argv: list[str] | None = None) -> int:
    # `python -m lcpatch.cli.train` (what `accelerate launch -m` runs) is `lcpatch train`: its usage says so.
    parser = argparse.ArgumentParser(
        prog="lcpatch train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
