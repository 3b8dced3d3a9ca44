"""`lcpatch eval`'s arguments, importable without torch (lcpatch.eval.run, which runs it, imports torch); the
command's description is lcpatch.eval.run's docstring."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import VANILLA, module_doc

SMOLLM2 = "smollm2"  # --model: SmolLM2-135M-Instruct from its GGUF file (lcpatch.demo.smollm2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = module_doc("lcpatch.eval.run")
    parser.add_argument(
        "--model", required=True, help=f"a local Hugging Face model folder, or '{SMOLLM2}' (SmolLM2-135M from GGUF)"
    )
    parser.add_argument(
        "--recipes", default=f"{VANILLA},lm-infinite", help=f"comma-separated: '{VANILLA}', recipe names or YAML paths"
    )
    parser.add_argument("--task", required=True, help="ppl, passkey or needle")
    parser.add_argument("--lengths", default="1k", help="comma-separated prompt lengths in tokens, e.g. 1k,2k,4096")
    parser.add_argument("--depths", default="0,0.5,1", help="needle depths in [0, 1] (passkey, needle)")
    parser.add_argument("--samples", type=int, default=5, help="prompts per (length, depth) cell (default 5)")
    parser.add_argument(
        "--text",
        required=True,
        help="the text or haystack: a plain-text file, a folder or glob of .txt files, or a datasets name "
        "(its train split's documents joined)",
    )
    parser.add_argument("--text-config", help="with a datasets name for --text: its configuration")
    parser.add_argument("--text-field", default="text", help="with a datasets name for --text: the text column")
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.json, plots)")
    parser.add_argument("--bucket", type=int, default=2048, help="ppl: tokens per position bucket (default 2048)")
    parser.add_argument("--chunk", type=int, default=4096, help="ppl: tokens per forward pass (default 4096)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--seed", type=int, default=0, help="seed of keys, needles and haystack offsets")
    parser.add_argument("--gguf", type=Path, help="with --model smollm2: a local GGUF file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    from ..eval import run

    return run.run_cli(args)
