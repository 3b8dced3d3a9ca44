"""A long prompt's prefill against its compute floor, per attention backend, chunk size and compile setting (CUDA GPU).

    python benchmarks/decode/prefill_sweep.py --out DIR [--length 131072] [--layers 32] \
        [--cells triton:4096:false,triton:4096:auto,flash:4096:auto,flash:8192:auto] [--recipe lm-infinite]

Llama-3-8B shape with random bf16 weights (`lcpatch bench`'s preset), batch 1. Each cell (BACKEND:CHUNK:COMPILE
= attention.backend, generation.prefill_chunk, generation.compile) times `generate(max_new_tokens=1)` over a
--length prompt twice after an untimed 16k-token call (kernel compilation; its time is reported as
`warmup_s`) and keeps the faster, with the peak memory over the weights. The floor beside them: every
Linear layer's matrix product over the prompt, one chunk at a time (cuBLAS, one CUDA graph per chunk),
which no attention method avoids. Writes DIR/prefill-<recipe>-<length>.json and prints one line per cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from profile_step import graph_seconds

import lcpatch
from lcpatch.bench.presets import load_model
from lcpatch.bench.timing import prefill_seconds
from lcpatch.cli.common import environment

COMPILE = {"auto": "auto", "true": True, "false": False}


def linear_floor(model, length: int, chunk: int) -> float:
    """Seconds for every Linear layer's product over `length` tokens, `chunk` rows at a time (the LM head on
    one row, as generate() computes it)."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    rows = min(chunk, length)
    inputs = {m.in_features: torch.randn(rows, m.in_features, device="cuda", dtype=torch.bfloat16) for m in linears}

    def work():
        for m in linears:
            F.linear(inputs[m.in_features], m.weight)

    return graph_seconds(work, repeats=5) * length / rows


def run_cell(model, ids: torch.Tensor, recipe: str, cell: str) -> dict:
    backend, chunk, compile_ = cell.split(":")
    row = {"cell": cell, "backend": backend, "chunk": int(chunk), "compile": compile_}
    torch._dynamo.reset()  # each cell compiles its own code, within dynamo's recompile limit
    try:
        base = lcpatch.load_recipe(recipe)
        generation = dataclasses.replace(base.generation, prefill_chunk=int(chunk), compile=COMPILE[compile_])
        attention = dataclasses.replace(base.attention, backend=backend)
        with (
            torch.no_grad(),
            lcpatch.patched(model, dataclasses.replace(base, attention=attention, generation=generation)),
        ):
            start = time.perf_counter()
            prefill_seconds(model, ids[:, -16384:])
            row["warmup_s"] = time.perf_counter() - start
            torch.cuda.reset_peak_memory_stats()
            weights = torch.cuda.memory_allocated()
            times = [prefill_seconds(model, ids) for _ in range(2)]
        row |= {
            "seconds": min(times),
            "runs_s": times,
            "peak_over_weights_gib": (torch.cuda.max_memory_allocated() - weights) / 2**30,
        }
    except Exception as exc:  # a backend that cannot run here (flash-attn missing): record it, keep going
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--recipe", default="lm-infinite")
    parser.add_argument("--cells", default="triton:4096:false,triton:4096:auto,flash:4096:auto,flash:8192:auto")
    args = parser.parse_args()
    for cell in args.cells.split(","):
        parts = cell.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in COMPILE:
            parser.error(
                f"--cells: {cell!r} is not BACKEND:CHUNK:COMPILE (e.g. flash:8192:auto; COMPILE auto|true|false)"
            )
    model, described, _ = load_model("llama3-8b", args.layers, torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device="cuda")
    result = {
        "environment": environment("cuda") | {"model": described, "command": " ".join([sys.executable, *sys.argv])},
        "length": args.length,
        "recipe": args.recipe,
        "cells": [],
    }
    chunks = sorted({int(cell.split(":")[1]) for cell in args.cells.split(",")})
    result["linear_floor_s"] = {chunk: linear_floor(model, args.length, chunk) for chunk in chunks}
    print(f"{described}; {args.length} tokens; linear floor {result['linear_floor_s']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill-{Path(args.recipe).stem}-{args.length}.json"
    for cell in args.cells.split(","):
        row = run_cell(model, ids, args.recipe, cell)
        print(json.dumps(row), flush=True)
        result["cells"].append(row)
        path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
