"""The `lcpatch` command: one subcommand per job, each defined next to the code it runs.

Each command's module defines its arguments (`add_arguments(parser)`) with light imports only and imports what
it runs inside `run_cli(args)`, and only the command given is set up: `lcpatch --help`, `--version` and every
`lcpatch COMMAND --help` answer without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from . import bench

# name -> (the module with add_arguments(parser) and run_cli(args), its one-line summary in `lcpatch --help`).
COMMANDS = {
    "demo": ("lcpatch.demo.run", "perplexity by position on a long text: SmolLM2-135M vanilla vs lcpatch recipes"),
    "train": (
        "lcpatch.cli.train",
        "fine-tune a model as a recipe's training section says (E2-LLM, LongPO, LOGO, plain causal LM)",
    ),
    "eval": (
        "lcpatch.cli.eval",
        "long-context quality (ppl, passkey, needle) of a model under several recipes: JSON, plots, table",
    ),
    "data": (
        "lcpatch.cli.data",
        "training data written by the model itself: LongPO's short-to-long preference pairs, LOGO's preference rows",
    ),
    "bench": (
        "lcpatch.cli.bench",
        "cost against context length (default), the attention kernels, or decode speed: JSON, table, figure",
    ),
}


def _command(argv: list[str]) -> str | None:
    """The command named in argv (its first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lcpatch", description="Long context for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"lcpatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    given = _command(argv)
    jobs = {}
    for name, (module_name, summary) in COMMANDS.items():
        if name != given:  # listed by `lcpatch --help`; only the command given imports its module
            commands.add_parser(name, help=summary)
            continue
        module = importlib.import_module(module_name)
        jobs[name] = commands.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(jobs[name])
        jobs[name].set_defaults(run=module.run_cli)
    if given == "bench":
        argv = bench.with_default(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top-level one: it is that command's flag that was mistyped
        jobs[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.run(args)
