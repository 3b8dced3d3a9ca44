"""`lcpatch bench [BENCHMARK] [OPTIONS]`: one of three benchmarks, each with its own options
(`lcpatch bench BENCHMARK --help` lists them); without a BENCHMARK, cost.

    lcpatch bench --model llama3-8b --recipes vanilla,lm-infinite --lengths 4k,16k --out DIR
    lcpatch bench attention --out DIR
    lcpatch bench decode --out DIR --tiny
"""

from __future__ import annotations

import argparse
import importlib
import textwrap
from pathlib import Path

from ..bench.shapes import PRESETS
from .arguments import DTYPE_NAMES, VANILLA, module_doc

DEFAULT = "cost"  # `lcpatch bench` without a BENCHMARK

# decode's methods, and the values of its options left unset (a full run, and --tiny).
DECODE_METHODS = ("vanilla", "hf-compile", "lcpatch-eager", "lcpatch-fast")
DECODE_DEFAULTS = {
    "lengths": "4k,32k,128k,1M",
    "batch": "1,8",
    "new_tokens": 64,
    "compile_cells": "all",
    "max_tokens": 2**20,
}
DECODE_TINY_DEFAULTS = {
    "lengths": "64,256,1k",
    "batch": "1,2",
    "new_tokens": 16,
    "compile_cells": "",
    "max_tokens": 4096,
}


def _summary(name: str) -> str:
    """The first paragraph of lcpatch.bench.NAME's docstring, read from its source: importing it loads torch."""
    return " ".join(module_doc(f"lcpatch.bench.{name}").split("\n\n")[0].split())


def with_default(argv: list[str]) -> list[str]:
    """`lcpatch bench --model ...` as `lcpatch bench cost --model ...` (argv: the words after `lcpatch`)."""
    at = argv.index("bench") + 1
    if at == len(argv) or argv[at].startswith("-") and argv[at] not in ("-h", "--help"):
        return [*argv[:at], DEFAULT, *argv[at:]]
    return argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [-h] [BENCHMARK] [OPTIONS ...]"
    parser.description = (
        (parser.description or "")
        + "\n\nBenchmarks:\n"
        + "\n".join(
            textwrap.fill(
                f"{name}{' (default)' if name == DEFAULT else ''}: {_summary(name)}",
                width=100,
                initial_indent="  ",
                subsequent_indent="    ",
            )
            for name in BENCHMARKS
        )
    )
    parser.add_argument(
        "benchmark", metavar="BENCHMARK", choices=BENCHMARKS, help=f"{', '.join(BENCHMARKS)} (default {DEFAULT})"
    )
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options (see its --help)")


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = module_doc("lcpatch.bench.cost").format(presets=", ".join(PRESETS))
    parser.add_argument(
        "--model", required=True, help=f"a model folder, a config.json, or a preset: {', '.join(PRESETS)}"
    )
    parser.add_argument("--layers", type=int, help="random-weight models only: keep the first N decoder layers")
    parser.add_argument("--recipes", default=f"{VANILLA},lm-infinite", help=f"'{VANILLA}', recipe names or YAML paths")
    parser.add_argument("--lengths", default="4k,16k,64k", help="prompt lengths, e.g. '4k,16k,64k' (k = 1024)")
    parser.add_argument("--batch", default="1", help="batch sizes, e.g. '1,8'")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed after the first token")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for cost.json, cost.md and cost.png")
    parser.add_argument("--no-progress", action="store_true", help="no per-cell log lines")


def add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = module_doc("lcpatch.bench.attention").split("\n\n")[0]
    parser.add_argument("--out", type=Path, required=True, help="folder for attention.json and attention.png")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument(
        "--backward-lengths",
        type=int,
        nargs="*",
        default=None,
        help="lengths that also time forward+backward (default: all)",
    )
    parser.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768, 131072])
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="time only the methods whose name contains one of these words (default: all)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also time the Triton prefill kernels' candidate block configs"
    )


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = module_doc("lcpatch.bench.decode")
    parser.add_argument("--out", type=Path, required=True, help="folder for decode.json, decode.md and decode.png")
    parser.add_argument("--model", default="llama3-8b", help=f"a preset ({', '.join(PRESETS)}) or a config.json")
    parser.add_argument("--layers", type=int, help="keep the first N decoder layers (quicker runs)")
    parser.add_argument("--lengths", help=f"prompt lengths (k = 1024, M = 1024²); default {DECODE_DEFAULTS['lengths']}")
    parser.add_argument("--batch", help=f"batch sizes; default {DECODE_DEFAULTS['batch']}")
    parser.add_argument(
        "--new-tokens", type=int, help=f"tokens decoded per call; default {DECODE_DEFAULTS['new_tokens']}"
    )
    parser.add_argument("--methods", default=",".join(DECODE_METHODS), help=f"a subset of {','.join(DECODE_METHODS)}")
    parser.add_argument("--recipe", default="lm-infinite", help="lcpatch recipe (its generation.decode is set here)")
    parser.add_argument(
        "--compile-cells",
        help=f"LENGTH:BATCH cells where hf-compile runs, or all; default {DECODE_DEFAULTS['compile_cells']}",
    )
    parser.add_argument("--max-tokens", type=int, help="skip cells with batch × length above this; default 1M")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no cell after this many seconds")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"a toy model on the CPU: checks the script; defaults {DECODE_TINY_DEFAULTS}",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    parser.add_argument("--seed", type=int, default=0)


# `lcpatch bench NAME`: its options, and the module lcpatch.bench.NAME, with run_cli(args), that runs it. The options
# live here, apart from the benchmarks, which import torch: they are parsed (and --help answered) before that import.
BENCHMARKS = {"cost": add_cost_arguments, "attention": add_attention_arguments, "decode": add_decode_arguments}


def benchmark_parser(name: str) -> argparse.ArgumentParser:
    """`lcpatch bench NAME`'s parser, also what `python -m lcpatch.bench.NAME` parses."""
    parser = argparse.ArgumentParser(prog=f"lcpatch bench {name}", formatter_class=argparse.RawDescriptionHelpFormatter)
    BENCHMARKS[name](parser)
    return parser


def run_cli(args: argparse.Namespace) -> int:
    options = benchmark_parser(args.benchmark).parse_args(args.options)  # before the import: --help loads no torch
    return importlib.import_module(f"lcpatch.bench.{args.benchmark}").run_cli(options)
