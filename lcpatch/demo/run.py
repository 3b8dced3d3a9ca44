"""The main demo: perplexity by position on a long text, SmolLM2-135M-Instruct vanilla vs lcpatch recipes.

    lcpatch demo --text book.txt --max-length 16384 --bucket 2048 --recipes vanilla,lm-infinite
    python -m lcpatch.demo.run ...    (the same)

SmolLM2 was trained at 8k tokens: unpatched, its perplexity explodes past 8k; a long-context
recipe should keep it near its short-context level.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..cli.arguments import DTYPE_NAMES, VANILLA
from ..errors import LcpatchError, run_reporting_errors

BOOK = "melville-moby_dick.txt"
_GUTENBERG = Path("shared", "data", "gutenberg")
OUT = Path("lcpatch-demo.json")
CHUNK = 1024  # tokens per forward pass: the progress bars advance this often

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text",
        type=Path,
        help="a long plain-text file in UTF-8 (e.g. a Project Gutenberg book, 'Plain Text UTF-8'); a file in "
        "another encoding is refused with the iconv command that converts it; default: "
        f"{BOOK} from ../shared/data/gutenberg if present",
    )
    parser.add_argument("--max-length", type=int, default=16384, help="tokens of the text to score (default 16384)")
    parser.add_argument("--bucket", type=int, default=2048, help="tokens per reported bucket (default 2048)")
    parser.add_argument(
        "--chunk",
        type=int,
        default=CHUNK,
        help=f"tokens per forward pass, the cache carried between passes; the progress bars advance once per "
        f"pass (default {CHUNK})",
    )
    parser.add_argument(
        "--recipes",
        default=f"{VANILLA},lm-infinite",
        help=f"comma-separated columns: '{VANILLA}' (the unpatched model), built-in recipe names or recipe YAML "
        "paths (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help="auto: bfloat16 on cuda, float32 on cpu"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT,
        help="results JSON; its folder must exist (default %(default)s, in the current folder; the run ends by "
        "printing where it was written)",
    )
    parser.add_argument("--gguf", type=Path, help="local SmolLM2 GGUF file, for machines without a package index")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _at_least(args: argparse.Namespace, name: str, minimum: int = 1) -> int:
    value = getattr(args, name)
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise LcpatchError(f"--{name.replace('_', '-')} must be {kind}; got {value}.")
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


def read_text(path: Path, max_length: int) -> str:
    """The text of --text, decoded as UTF-8 with universal newlines; an error naming the file if it is not text, not UTF-8 or empty."""
    if not path.is_file():
        raise LcpatchError(f"--text {str(path)!r} is not a file; pass a long plain-text file.")
    data = path.read_bytes()
    if b"\0" in data:
        raise LcpatchError(
            f"--text {str(path)!r} is not a text file (it holds NUL bytes: a program or binary data); pass a "
            "plain-text file, e.g. a Project Gutenberg book."
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LcpatchError(
            f"--text {str(path)!r} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}). If it is "
            f"text in another encoding, convert it first, e.g. `iconv -f latin1 -t utf-8 {path} > "
            f"{path.stem}.utf8.txt`, and pass the new file."
        ) from None
    if not text.strip():
        raise LcpatchError(
            f"--text {str(path)!r} has no text (it is empty or only whitespace); pass a long plain-text file "
            f"(the demo scores its first --max-length {max_length} tokens)."
        )
    # Line ends as text mode reads them (Gutenberg books end lines with CRLF): what was scored before.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def first_tokens(tokenizer, text: str, path: Path, max_length: int) -> tuple[list[int], int]:
    """The first `max_length` tokens of the text and its total token count; an error if it is shorter."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise LcpatchError(
            f"--text {str(path)!r} has only {len(ids)} token(s); perplexity needs at least 2: pass a longer text."
        )
    if len(ids) < max_length:
        raise LcpatchError(
            f"--text {str(path)!r} has only {len(ids)} tokens, fewer than --max-length {max_length}; "
            f"pass --max-length {len(ids)} or less, or a longer text."
        )
    return ids[:max_length], len(ids)


def check_out(path: Path) -> Path:
    """--out as an absolute path, checked before any work: a file name in an existing, writable folder."""
    path = path.expanduser().absolute()
    if path.is_dir():
        raise LcpatchError(f"--out {str(path)!r} is a folder; pass a file name, e.g. {path / OUT}.")
    if not path.parent.is_dir():
        raise LcpatchError(
            f"--out {str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first "
            f"(mkdir -p {path.parent}) or pass a file in an existing folder."
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise LcpatchError(
            f"--out {str(path)!r}: the folder {str(path.parent)!r} is not writable here; pass a file in a folder "
            "you can write to."
        )
    return path


def run(args: argparse.Namespace) -> dict:
    """Check the arguments, load SmolLM2, measure every column, print the table and write the JSON."""
    max_length = _at_least(args, "max_length", 2)
    bucket, chunk = (_at_least(args, name) for name in ("bucket", "chunk"))
    out = check_out(args.out)
    text_path = args.text if args.text is not None else default_text()
    text = read_text(text_path, max_length)
    # Imported here, not above: `lcpatch demo --help` must not load torch.
    import torch

    from ..api import patched, patched_recipe
    from ..cli.common import environment, format_table, parse_recipes, resolve_device, resolve_dtype
    from ..eval.perplexity import perplexity_by_position
    from . import smollm2

    names = parse_recipes(args.recipes)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")

    model, tokenizer = smollm2.load_smollm2(dtype=dtype, device=device, gguf_path=args.gguf)
    ids, total = first_tokens(tokenizer, text, text_path, max_length)
    ids = torch.tensor(ids)
    logger.info("%s: %d tokens, buckets of %d, %s %s", text_path, max_length, bucket, device, dtype_name)

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

    table = format_table(results, seconds)
    print(
        f"\nPerplexity by position, SmolLM2-135M-Instruct, {text_path.name}, {max_length} tokens "
        f"({device}, {dtype_name}):"
    )
    print(table)
    report = {
        "model": {"name": "SmolLM2-135M-Instruct", **smollm2.model_facts(model)},
        "environment": environment(device),
        "dtype": dtype_name,
        "text": {"path": str(text_path), "tokens": total, "tokens_used": max_length},
        "max_length": max_length,
        "bucket": bucket,
        "chunk": chunk,
        "seconds": seconds,
        "recipes": recipes,
        "results": results,
        "table": table,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    # `python -m lcpatch.demo.run` is `lcpatch demo`: its usage says so.
    parser = argparse.ArgumentParser(
        prog="lcpatch demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    return run_reporting_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
