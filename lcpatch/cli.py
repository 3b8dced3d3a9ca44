"""The `lcpatch` command: one subcommand per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import sys

from . import demo, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcpatch", description="Long context for Hugging Face causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="perplexity by position on a long text: SmolLM2-135M vanilla vs lcpatch recipes",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run_cli)
    train_parser = commands.add_parser(
        "train",
        help="fine-tune a model as a recipe's training section says (E2-LLM)",
        description=train.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_arguments(train_parser)
    train_parser.set_defaults(run=train.run_cli)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
