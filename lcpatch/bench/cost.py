"""Cost against context length, per recipe: prefill time, decode tokens/s and peak memory of `generate()`.

    lcpatch bench --model llama3-8b --recipes vanilla,lm-infinite,infllm --lengths 4k,32k,128k --out DIR
    lcpatch bench --model path/to/model --recipes vanilla,my-recipe.yaml --lengths 4k,16k --batch 1,8 --out DIR
    lcpatch bench --model smollm2-135m --layers 4 --lengths 1k,2k --device cpu --out DIR   (a quick CPU look)

--model is a local model folder (its weights), a config.json (random weights), or a shape preset with
random weights (cost does not depend on the weights): {presets}. --layers N keeps the first N layers of a
random-weight model, for quick runs. The prompt is random token ids, the same for every recipe.

Each cell is one `model.generate()` of 1 + --new-tokens tokens, after one untimed call per recipe and batch
(kernel compilation, allocator growth): prefill is the time from the call to the first token's logits,
decode the rate of the tokens after the first decode step (per sequence; ×batch for the aggregate), peak
memory the growth
of CUDA-allocated memory (on a GPU) or of the process's resident memory (on a CPU, sampled every 2 ms)
over what the model held before the call. A cell that runs out of memory is recorded as such and the
longer lengths of that recipe and batch are skipped. Writes DIR/cost.json (rewritten after every cell),
DIR/cost.md and DIR/cost.png.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from ..cli.common import length_label, parse_batches, parse_lengths, parse_recipes, resolve_device, resolve_dtype
from ..errors import LcpatchError, run_reporting_errors
from .presets import load_model
from .report import report, run_environment
from .timing import measure

logger = logging.getLogger(__name__)

RESULTS = "cost.json"


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run(args: argparse.Namespace) -> dict:
    recipes = parse_recipes(args.recipes)
    lengths = parse_lengths(args.lengths)
    batches = parse_batches(args.batch)
    if args.new_tokens < 2:
        raise LcpatchError(f"--new-tokens {args.new_tokens}: give at least 2 (decode is timed after its first step).")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    model, described, weights = load_model(args.model, args.layers, device, dtype)
    result = {"schema": 1, "environment": run_environment(device, dtype, described, weights), "args": {}, "runs": []}
    result["args"] = {"recipes": recipes, "lengths": lengths, "batch": batches, "new_tokens": args.new_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (max(batches), max(lengths)), generator=generator)
    for recipe in recipes:
        for batch in batches:
            # Untimed: the first call of a recipe pays one-off costs (kernel compilation, allocator growth).
            measure(model, recipe, prompt[:batch, -min(lengths) :].to(device), 2)
            failed = None
            for length in lengths:
                cell = {"recipe": recipe, "batch": batch, "length": length}
                if failed:
                    cell["skipped"] = f"a shorter length failed: {failed}"
                else:
                    try:
                        cell |= measure(model, recipe, prompt[:batch, -length:].to(device), args.new_tokens)
                    except (torch.OutOfMemoryError, RuntimeError) as exc:
                        if not _is_out_of_memory(exc):
                            raise
                        failed = cell["error"] = "out of memory"
                    except LcpatchError as exc:  # e.g. a recipe's configured sequence limit
                        failed = cell["error"] = str(exc)
                result["runs"].append(cell)
                (args.out / RESULTS).write_text(json.dumps(result, indent=1))
                if not args.no_progress:
                    logger.info("%s", json.dumps(cell))
    report(result, args.out / RESULTS, markdown(result), plot)
    return result


def _format(cell: dict) -> str:
    if "prefill_s" not in cell:
        return "OOM" if cell.get("error") == "out of memory" else ("skipped" if "skipped" in cell else "error")
    rate = cell["decode_tokens_per_s"]
    return f"{cell['prefill_s']:.3g} s / {rate:.3g} tok/s / {cell['peak_memory_mib']:.0f} MiB"


def markdown(result: dict) -> str:
    """One row per (recipe, batch), one column per length: prefill / decode per sequence / peak memory."""
    lengths = result["args"]["lengths"]
    lines = [
        "| recipe | batch | " + " | ".join(length_label(n) for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for recipe in result["args"]["recipes"]:
        for batch in result["args"]["batch"]:
            cells = {c["length"]: c for c in result["runs"] if c["recipe"] == recipe and c["batch"] == batch}
            row = " | ".join(_format(cells[n]) if n in cells else "" for n in lengths)
            lines.append(f"| {recipe} | {batch} | {row} |")
    return "\n".join(lines) + "\n\ncells: prefill time / decode tokens/s per sequence / peak memory over the weights"


def plot(result: dict, plt):
    """Prefill, decode and memory against prompt length: a line per recipe and batch."""
    panels = (("prefill_s", "prefill (s)"), ("decode_tokens_per_s", "decode (tokens/s per sequence)"))
    panels += (("peak_memory_mib", "peak memory over weights (MiB)"),)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for recipe in result["args"]["recipes"]:
            for batch in result["args"]["batch"]:
                points = [
                    (c["length"], c.get(key)) for c in result["runs"] if c["recipe"] == recipe and c["batch"] == batch
                ]
                points = [p for p in points if p[1] is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=f"{recipe}, batch {batch}")
        ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel=label)
        ax.legend(fontsize=8)
    return fig


def run_cli(args: argparse.Namespace) -> int:
    return run_reporting_errors(run, args)
