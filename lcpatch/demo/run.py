"""The main demo: perplexity by position on a long text, SmolLM2-135M-Instruct vanilla vs lcpatch recipes.

    lcpatch demo --text book.txt --max-length 16384 --bucket 2048 --recipes vanilla,lm-infinite
    python -m lcpatch.demo.run ...

SmolLM2 was trained at 8k tokens: unpatched, its perplexity explodes past 8k; a long-context
recipe should keep it near its short-context level.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from ..api import patched, patched_recipe
from ..cli.common import DTYPES, VANILLA, environment, format_table, parse_recipes, resolve_device, resolve_dtype
from ..errors import LcpatchError, run_reporting_errors
from ..eval.perplexity import perplexity_by_position
from . import smollm2

BOOK = "melville-moby_dick.txt"
_GUTENBERG = Path("shared", "data", "gutenberg")

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text",
        type=Path,
        help="a long plain-text file (e.g. a Project Gutenberg book); default: "
        f"{BOOK} from ../shared/data/gutenberg if present",
    )
    parser.add_argument("--max-length", type=int, default=16384, help="tokens of the text to score (default 16384)")
    parser.add_argument("--bucket", type=int, default=2048, help="tokens per reported bucket (default 2048)")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per forward pass (default 4096)")
    parser.add_argument(
        "--recipes",
        default=f"{VANILLA},lm-infinite",
        help=f"comma-separated columns: '{VANILLA}' (the unpatched model), built-in recipe names or recipe YAML paths",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on cuda, float32 on cpu"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("lcpatch-demo.json"), help="results JSON (default %(default)s)"
    )
    parser.add_argument("--gguf", type=Path, help="local SmolLM2 GGUF file, for machines without a package index")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, name)
    if value < 1:
        raise LcpatchError(f"--{name.replace('_', '-')} must be a positive integer; got {value}.")
    return value


def default_text() -> Path:
    """A Gutenberg book from the project's shared data, looked for next to the working and source folders."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root.parent / _GUTENBERG / BOOK
        if candidate.is_file():
            return candidate
    raise LcpatchError(
        f"no --text given and no {BOOK} found in ../{_GUTENBERG.as_posix()}. Pass --text with any long "
        "plain-text file, e.g. a book from Project Gutenberg (https://www.gutenberg.org, 'Plain Text UTF-8')."
    )


def read_tokens(tokenizer, path: Path, max_length: int) -> tuple[list[int], int]:
    """The first `max_length` tokens of the text and its total token count; an error if it is shorter."""
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max_length:
        raise LcpatchError(
            f"--text {str(path)!r} has only {len(ids)} tokens, fewer than --max-length {max_length}; "
            f"pass --max-length {len(ids)} or less, or a longer text."
        )
    return ids[:max_length], len(ids)


def run(args: argparse.Namespace) -> dict:
    """Check the arguments, load SmolLM2, measure every column, print the table and write the JSON."""
    max_length, bucket, chunk = (_positive(args, n) for n in ("max_length", "bucket", "chunk"))
    names = parse_recipes(args.recipes)
    text = args.text if args.text is not None else default_text()
    if not text.is_file():
        raise LcpatchError(f"--text {str(text)!r} is not a file; pass a long plain-text file.")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")

    model, tokenizer = smollm2.load_smollm2(dtype=dtype, device=device, gguf_path=args.gguf)
    ids, total = read_tokens(tokenizer, text, max_length)
    ids = torch.tensor(ids)
    logger.info("%s: %d tokens, buckets of %d, %s %s", text, max_length, bucket, device, dtype_name)

    results, recipes, seconds = {}, {}, {}
    for name in names:
        began = time.perf_counter()
        measure = dict(bucket=bucket, chunk=chunk, progress=not args.no_progress, desc=name)
        if name == VANILLA:
            recipes[name] = None
            results[name] = perplexity_by_position(model, ids, **measure)
        else:
            with patched(model, name):
                recipes[name] = patched_recipe(model).to_dict()
                results[name] = perplexity_by_position(model, ids, **measure)
        seconds[name] = round(time.perf_counter() - began, 2)
        logger.info("%s: overall perplexity %.2f in %.1f s", name, results[name]["overall"]["ppl"], seconds[name])

    table = format_table(results)
    print(
        f"\nPerplexity by position, SmolLM2-135M-Instruct, {text.name}, {max_length} tokens ({device}, {dtype_name}):"
    )
    print(table)
    report = {
        "model": {"name": "SmolLM2-135M-Instruct", **smollm2.model_facts(model)},
        "environment": environment(device),
        "dtype": dtype_name,
        "text": {"path": str(text), "tokens": total, "tokens_used": max_length},
        "max_length": max_length,
        "bucket": bucket,
        "chunk": chunk,
        "seconds": seconds,
        "recipes": recipes,
        "results": results,
        "table": table,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lcpatch.demo.run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    return run_reporting_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
