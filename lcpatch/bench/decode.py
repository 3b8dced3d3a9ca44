"""Decode speed of `generate()` after long prompts: lcpatch's fast path next to transformers' own.

    python -m lcpatch.bench.decode --out DIR                  # Llama-3-8B shape, random weights, bf16, CUDA
    python -m lcpatch.bench.decode --out DIR --layers 4 --lengths 4k,32k --batch 1     # a quick look
    python -m lcpatch.bench.decode --out DIR --tiny           # a toy model on the CPU: checks the script

Methods, each a plain greedy `model.generate()` of 1 + --new-tokens tokens on random prompt ids:
- vanilla: transformers' DynamicCache and SDPA; skipped where its KV cache would not fit in device memory;
- hf-compile: transformers' static cache, whose decode step generate() compiles (torch.compile,
  reduce-overhead); at every cell whose cache fits (or only at --compile-cells; every new shape compiles
  anew); its error is recorded;
- lcpatch-eager: --recipe (default lm-infinite: 10 sinks, window = training length), generation.decode eager;
- lcpatch-fast: the same recipe with generation.decode graph (static on a CPU, which has no CUDA graphs).
lcpatch prefills its prompts in chunks (generation.prefill_chunk). Decode tokens/s is per sequence, over
the steps after the first decode step (which captures the graph or compiles: `first_step_s`); ×batch for
the aggregate; on a GPU also as a share of the bandwidth limit: a step reads every weight, so it takes at
least the parameter bytes over the device's measured copy bandwidth (`limit_ratio`). Peak memory: its growth over the weights during the call (CUDA max_memory_allocated;
the resident set on a CPU). Cells past --max-tokens (batch × length) or started after --budget-s are recorded
as skipped. Writes DIR/decode.json (after every cell), DIR/decode.md and DIR/decode.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import time

import torch

from ..cli.bench import DECODE_DEFAULTS, DECODE_METHODS, DECODE_TINY_DEFAULTS, benchmark_parser
from ..cli.common import length_label, parse_batches, parse_lengths, resolve_device, resolve_dtype
from ..errors import LcpatchError, run_reporting_errors
from ..recipe import load_recipe
from .presets import load_model
from .report import report, run_environment
from .timing import copy_bandwidth, measure

logger = logging.getLogger(__name__)

RESULTS = "decode.json"


def _cells(spec: str) -> set[tuple[int, int]] | None:
    """The LENGTH:BATCH cells where hf-compile runs; None for all."""
    if spec.strip() == "all":
        return None
    cells = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        length, _, batch = part.partition(":")
        if not batch.isdigit():
            raise LcpatchError(f"--compile-cells: {part!r} is not LENGTH:BATCH; give e.g. '4k:1,32k:1', or 'all'.")
        cells.add((parse_lengths(length)[0], int(batch)))
    return cells


def _methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in DECODE_METHODS]
    if unknown or not methods:
        raise LcpatchError(
            f"--methods: {spec!r} names {unknown or 'nothing'}; choose among {', '.join(DECODE_METHODS)}."
        )
    return methods


def lcpatch_recipe(spec: str, decode: str):
    recipe = load_recipe(spec)
    return dataclasses.replace(recipe, generation=dataclasses.replace(recipe.generation, decode=decode))


def kv_cache_gib(config, batch: int, tokens: int, dtype: torch.dtype) -> float:
    """Size of a full (unbounded) KV cache, as vanilla transformers keeps it."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    return per_token * batch * tokens / 2**30


def _skip_reason(method, length, batch, args, model, dtype, device) -> str | None:
    if batch * length > args.max_tokens:
        return f"batch × length above --max-tokens {args.max_tokens}"
    if method == "hf-compile":
        if device.type != "cuda":
            return "transformers compiles generate() on CUDA devices only"
        if args.compile_cells is not None and (length, batch) not in args.compile_cells:
            return "not in --compile-cells"
    if method in ("vanilla", "hf-compile") and device.type == "cuda":
        kv = kv_cache_gib(model.config, batch, length + args.new_tokens + 1, dtype)
        free = (torch.cuda.mem_get_info(device)[1] - torch.cuda.memory_allocated(device)) / 2**30
        if kv > 0.9 * free:
            return f"OOM: its KV cache alone would take {kv:.0f} GiB of {free:.0f} GiB left"
    return None


def run_method(method: str, model, ids: torch.Tensor, args, fast_mode: str) -> dict:
    if method == "vanilla":
        return measure(model, None, ids, args.new_tokens)
    if method == "hf-compile":
        from transformers import CompileConfig

        kwargs = dict(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))
        # Each cell compiles for its own shapes, as in a fresh process: after another batch size dynamo gives
        # shape-generic code, which halved hf-compile's speed at batch 1 after batch 8 (H100, 2026-12-07).
        torch._dynamo.reset()
        start = time.perf_counter()
        measure(model, None, ids, args.new_tokens, **kwargs)  # compiles for these shapes
        return {"compile_call_s": time.perf_counter() - start} | measure(model, None, ids, args.new_tokens, **kwargs)
    decode = "eager" if method == "lcpatch-eager" else fast_mode
    return {"decode": decode} | measure(model, lcpatch_recipe(args.recipe, decode), ids, args.new_tokens)


def _error(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "OOM"
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def run(args: argparse.Namespace) -> dict:
    for name, value in (DECODE_TINY_DEFAULTS if args.tiny else DECODE_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tiny and args.device == "auto":
        args.device = "cpu"
    lengths, batches, methods = parse_lengths(args.lengths), parse_batches(args.batch), _methods(args.methods)
    args.compile_cells = _cells(args.compile_cells)
    if args.new_tokens < 2:
        raise LcpatchError(f"--new-tokens {args.new_tokens}: give at least 2 (the rate is timed after step 1).")
    lcpatch_recipe(args.recipe, "eager")  # a bad recipe fails now, not after the first cells
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    fast_mode = "graph" if device.type == "cuda" else "static"
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    model, described, weights = load_model("tiny" if args.tiny else args.model, args.layers, device, dtype)
    result = {
        "schema": 1,
        "environment": run_environment(device, dtype, described, weights),
        "args": {
            "lengths": lengths,
            "batch": batches,
            "methods": methods,
            "new_tokens": args.new_tokens,
            "recipe": lcpatch_recipe(args.recipe, fast_mode).to_dict(),
            "compile_cells": "all" if args.compile_cells is None else sorted(args.compile_cells),
            "max_tokens": args.max_tokens,
        },
        "runs": [],
    }
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        result["environment"] |= {"copy_bandwidth_tb_s": bandwidth / 1e12, "limit_tokens_per_s": bandwidth / weights}
    args.out.mkdir(parents=True, exist_ok=True)
    prompt = torch.randint(3, model.config.vocab_size, (max(batches), max(lengths)), generator=torch.Generator())
    # Untimed: kernel compilation and allocator growth are one-off costs, not decode speed.
    for method in ("vanilla", "lcpatch-eager", "lcpatch-fast"):
        if method in methods:
            run_method(method, model, prompt[:1, -min(lengths) :].to(device), args, fast_mode)
    for batch in batches:
        for length in lengths:
            for method in methods:
                cell = {"method": method, "batch": batch, "length": length}
                reason = _skip_reason(method, length, batch, args, model, dtype, device)
                if reason is None and time.perf_counter() - began > args.budget_s:
                    reason = f"time budget (--budget-s {args.budget_s:.0f}) spent"
                if reason is not None:
                    cell["skipped"] = reason
                else:
                    try:
                        cell |= run_method(method, model, prompt[:batch, -length:].to(device), args, fast_mode)
                        if "limit_tokens_per_s" in result["environment"]:
                            limit = result["environment"]["limit_tokens_per_s"]
                            cell["limit_ratio"] = cell["decode_tokens_per_s"] / limit
                    except Exception as exc:  # one method failing (OOM, compile error) must not end the run
                        cell["error"] = _error(exc)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                result["runs"].append(cell)
                result["wall_s"] = time.perf_counter() - began
                (args.out / RESULTS).write_text(json.dumps(result, indent=1))
                logger.info("%s", json.dumps(cell))
    report(result, args.out / RESULTS, markdown(result), plot)
    return result


def _format(cell: dict | None) -> str:
    if cell is None:
        return ""
    if "skipped" in cell:
        return "OOM (skipped)" if cell["skipped"].startswith("OOM") else "skipped"
    if "error" in cell:
        return cell["error"] if cell["error"] == "OOM" else "error"
    share = f" ({cell['limit_ratio']:.0%})" if "limit_ratio" in cell else ""
    return f"{cell['decode_tokens_per_s']:.1f} tok/s{share}, {cell['peak_memory_mib'] / 1024:.2f} GiB"


def markdown(result: dict) -> str:
    """One row per (batch, prompt length), one column per method: decode tokens/s per sequence, peak memory."""
    methods = result["args"]["methods"]
    env = result["environment"]
    lines = [
        f"{env['model']}, {env['dtype']}, {env['device']}; torch {env['torch']}, transformers "
        f"{env['transformers']}; {env['date']}",
        "",
        "| batch | prompt | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for batch in result["args"]["batch"]:
        for length in result["args"]["lengths"]:
            cells = {c["method"]: c for c in result["runs"] if c["batch"] == batch and c["length"] == length}
            row = " | ".join(_format(cells.get(m)) for m in methods)
            lines.append(f"| {batch} | {length_label(length)} | {row} |")
    lines += ["", "cells: decode tokens/s per sequence (after the first decode step), peak memory over the weights"]
    if "limit_tokens_per_s" in env:
        lines[-1] += (
            f"; in brackets, the share of the bandwidth limit: {env['limit_tokens_per_s']:.0f} steps/s "
            f"({env['weights_mib'] / 1024:.2f} GiB of weights at a measured {env['copy_bandwidth_tb_s']:.2f} TB/s)"
        )
    return "\n".join(lines)


def plot(result: dict, plt):
    """Decode speed and memory against prompt length, a column per batch size, a line per method."""
    batches = result["args"]["batch"]
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    for column, batch in enumerate(batches):
        for row, (key, label) in enumerate(
            (
                ("decode_tokens_per_s", "decode tokens/s per sequence"),
                ("peak_memory_mib", "peak memory over weights (GiB)"),
            )
        ):
            ax = axes[row][column]
            for method in result["args"]["methods"]:
                points = [
                    (c["length"], c[key] / 1024 if key == "peak_memory_mib" else c[key])
                    for c in result["runs"]
                    if c["method"] == method and c["batch"] == batch and key in c
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=method)
            ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel=label, title=f"batch {batch}")
            ax.legend(fontsize=8)
    return fig


def run_cli(args: argparse.Namespace) -> int:
    return run_reporting_errors(run, args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(benchmark_parser("decode").parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
