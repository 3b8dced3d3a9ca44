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

from .arguments import module_doc

# `lcpatch bench NAME`: the module lcpatch.bench.NAME, with main(argv); the first is the default.
BENCHMARKS = ("cost", "attention", "decode")
DEFAULT = BENCHMARKS[0]


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


def run_cli(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"lcpatch.bench.{args.benchmark}")
    return module.main(args.options)
