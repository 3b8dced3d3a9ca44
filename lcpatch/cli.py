"""The `lcpatch` command: one subcommand per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import sys

from . import demo, train
from .eval import run as eval_run


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
    eval_parser = commands.add_parser(
        "eval",
        help="long-context quality (ppl, passkey, needle) of a model under several recipes: JSON, plots, table",
        description=eval_run.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_run.add_arguments(eval_parser)
    eval_parser.set_defaults(run=eval_run.run_cli)
    bench_parser = commands.add_parser(
        "bench",
        help="benchmarks on a CUDA GPU; `lcpatch bench attention --out DIR` times the Triton kernels "
        "against dense SDPA, FlexAttention and SDPA with a boolean Λ mask",
    )
    bench_parser.add_argument("what", choices=["attention"])
    bench_parser.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark (see its --help)")
    bench_parser.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


def _bench(args: argparse.Namespace) -> int:
    from . import bench_attention

    return bench_attention.main(args.options)


if __name__ == "__main__":
    sys.exit(main())
