"""`lcpatch data BUILDER [OPTIONS]`: training data written by the model itself, each builder with its own
options (`lcpatch data BUILDER --help` lists them).

    lcpatch data longpo --model M --data BOOKS --out PAIRS    LongPO's short-to-long preference pairs
    lcpatch data logo --model M --data BOOKS --out ROWS       LOGO's preference rows
"""

from __future__ import annotations

import argparse
import importlib

from ..errors import run_reporting_errors

# `lcpatch data NAME`: the module lcpatch.data.NAME, with add_arguments(parser) and run_cli(args); it imports torch
# inside run_cli only, so that its --help does not load it.
DATA_BUILDERS = ("longpo", "logo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("builder", choices=DATA_BUILDERS, help=f"{' or '.join(DATA_BUILDERS)}")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of that builder (see its --help)")


def run_cli(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"lcpatch.data.{args.builder}")
    parser = argparse.ArgumentParser(
        prog=f"lcpatch data {args.builder}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return run_reporting_errors(module.run_cli, parser.parse_args(args.options))
