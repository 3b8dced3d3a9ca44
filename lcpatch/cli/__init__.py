"""The `lcpatch` command: one subcommand per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import run_reporting_errors


def main(argv: list[str] | None = None) -> int:
    # Imported here, not above: the commands import lcpatch.cli.common, which must not pull in every command.
    from ..demo import run as demo
    from ..eval import run as eval_run
    from . import train

    parser = argparse.ArgumentParser(prog="lcpatch", description="Long context for Hugging Face causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    jobs = (
        (demo, "demo", "perplexity by position on a long text: SmolLM2-135M vanilla vs lcpatch recipes"),
        (
            train,
            "train",
            "fine-tune a model as a recipe's training section says (E2-LLM, LongPO, LOGO, plain causal LM)",
        ),
        (
            eval_run,
            "eval",
            "long-context quality (ppl, passkey, needle) of a model under several recipes: JSON, plots, table",
        ),
    )
    for module, name, summary in jobs:  # each module brings its own arguments and runner
        job = commands.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(job)
        job.set_defaults(run=module.run_cli)
    data_parser = commands.add_parser(
        "data",
        help="training data written by the model itself: `lcpatch data longpo --model M --data BOOKS --out PAIRS` "
        "(LongPO's short-to-long preference pairs), `lcpatch data logo ...` (LOGO's preference rows); "
        "`lcpatch data BUILDER --help` lists a builder's options",
    )
    data_parser.add_argument("builder", choices=list(DATA_BUILDERS))
    data_parser.add_argument("options", nargs=argparse.REMAINDER, help="options of that builder (see its --help)")
    data_parser.set_defaults(run=_data)
    bench_parser = commands.add_parser(
        "bench",
        help="cost against context length: `lcpatch bench --model M --recipes vanilla,lm-infinite --lengths 4k,16k "
        "--out DIR` (prefill, decode tokens/s, peak memory); `lcpatch bench attention --out DIR` times the Triton "
        "kernels against dense SDPA, FlexAttention and SDPA with a boolean Λ mask (CUDA); `lcpatch bench decode "
        "--out DIR` compares generate() decode speed and memory of vanilla HF, HF static cache + torch.compile, "
        "lcpatch eager and lcpatch's fast (CUDA graph) path",
    )
    bench_parser.add_argument("what", choices=BENCHMARKS)
    bench_parser.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark (see its --help)")
    bench_parser.set_defaults(run=_bench)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1].startswith("-") and argv[1] not in ("-h", "--help")):
        argv.insert(1, "cost")  # `lcpatch bench --model ...` is the cost benchmark
    args = parser.parse_args(argv)
    return args.run(args)


# `lcpatch bench NAME`: the module lcpatch.bench.NAME, with main(argv).
BENCHMARKS = ("cost", "attention", "decode")
# `lcpatch data NAME`: the module lcpatch.data.NAME, with add_arguments(parser) and run_cli(args).
DATA_BUILDERS = ("longpo", "logo")


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"lcpatch.bench.{args.what}")
    return module.main(args.options)


def _data(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"lcpatch.data.{args.builder}")
    parser = argparse.ArgumentParser(
        prog=f"lcpatch data {args.builder}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return run_reporting_errors(module.run_cli, parser.parse_args(args.options))
