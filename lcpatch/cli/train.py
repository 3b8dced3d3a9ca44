"""Fine-tune a causal LM as a recipe's `training` section says (E2-LLM, LongPO, LOGO, or a plain causal-LM baseline).

    lcpatch train e2llm --model HuggingFaceTB/SmolLM2-135M --data "books/*.txt" --max-steps 200
    python -m lcpatch.cli.train my-recipe.yaml --sequence-length 2048 --g-max 8
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

import yaml

from ..errors import RecipeError
from ..training import TRAINING_METHODS
from ..training.runner import ACCELERATE_CONFIGS, accelerate_config, end_process_group, run, with_overrides


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
        "accelerate launch --config_file $(lcpatch train --accelerate-config fsdp2) -m lcpatch.cli.train RECIPE ...",
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
        end_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lcpatch.cli.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
