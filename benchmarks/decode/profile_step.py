"""Where a fast-decode step's time goes, against the memory-bandwidth limit (CUDA GPU).

    python benchmarks/decode/profile_step.py --out DIR [--recipe lm-infinite] [--layers 32] [--length 4096] [--batch 1,8]

Llama-3-8B shape with random bf16 weights (`lcpatch bench`'s preset). For each batch size, after a --length
prompt: the device's copy bandwidth and the limit it sets (parameter bytes / bandwidth); the floor of
reading every Linear weight once (cuBLAS, one CUDA graph); then for each --compile setting
(generation.compile) the captured step's time per token called directly and inside `generate()`, and the
kernels of --steps replays of it under torch.profiler (launches and time per token, by kernel).
Writes DIR/profile-<recipe>-<length>.txt and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import lcpatch
from lcpatch._compat import CACHE_ARG
from lcpatch.bench.decode import lcpatch_recipe
from lcpatch.bench.presets import load_model
from lcpatch.bench.timing import copy_bandwidth, measure
from lcpatch.cli.common import environment


def graph_seconds(work, repeats: int = 20) -> float:
    """Seconds per replay of `work` captured as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def weights_floor(model, batch: int) -> float:
    """Seconds to read every Linear weight once, as a step's matrix-vector products do (cuBLAS)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features, device="cuda", dtype=torch.bfloat16) for m in linears}

    def work():
        for m in linears:
            F.linear(inputs[m.in_features], m.weight)

    return graph_seconds(work)


def stepper(model, ids: torch.Tensor):
    """Prefill `ids` through generate(); return a function running one more single-token step on its cache."""
    out = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache, token = out.past_key_values, out.sequences[:, -1:]
    position = ids.shape[1]

    def step():
        nonlocal position
        model(input_ids=token, position_ids=torch.full_like(token, position), **{CACHE_ARG: cache})
        position += 1

    return step


def timed(step, count: int) -> float:
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def kernels(step, count: int) -> tuple[list[tuple[str, int, float]], float]:
    """(name, launches per step, µs per step) of every CUDA kernel over `count` steps, most time first; and
    the kernels' total µs per step."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(count):
            step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total and event.key != "cudaGraphLaunch":
            rows.append((event.key, event.count / count, total / count))
    rows.sort(key=lambda row: -row[2])
    return rows, sum(row[2] for row in rows)


def table(rows, limit: int = 25) -> list[str]:
    lines = [f"{'µs/step':>9} {'launches':>8}  kernel"]
    lines += [f"{us:9.1f} {n:8.1f}  {name[:110]}" for name, n, us in rows[:limit]]
    return lines


def fast_recipe(spec: str, compile: bool):
    recipe = lcpatch_recipe(spec, "graph")
    return dataclasses.replace(recipe, generation=dataclasses.replace(recipe.generation, compile=compile))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lm-infinite", help="a recipe name or YAML path")
    parser.add_argument("--layers", type=int, default=None, help="first N layers only (default: all 32)")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", default="false,true", help="generation.compile settings to profile")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    device = torch.device("cuda")
    model, described, weight_bytes = load_model("llama3-8b", args.layers, device, torch.bfloat16)
    bandwidth = copy_bandwidth(device)
    limit = weight_bytes / bandwidth
    name = Path(args.recipe).stem
    result = {"environment": environment(device), "model": described, "recipe": args.recipe, "length": args.length}
    result |= {"weight_bytes": weight_bytes, "copy_bandwidth_bytes_per_s": bandwidth, "limit_s": limit, "batches": {}}
    lines = [
        f"{described}; recipe {args.recipe}; {args.length}-token prompt; {torch.cuda.get_device_name()}; "
        f"torch {torch.__version__}; {result['environment']['date']}",
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; {weight_bytes / 1e9:.2f} GB of weights: limit "
        f"{limit * 1e3:.2f} ms per step ({1 / limit:.1f} steps/s)",
    ]
    with torch.no_grad():
        for batch in (int(b) for b in args.batch.split(",")):
            ids = torch.randint(3, model.config.vocab_size, (batch, args.length), device=device)
            floor = weights_floor(model, batch)
            row = {"weights_floor_s": floor}
            lines += [
                "",
                f"## batch {batch}",
                f"weights alone (cuBLAS, one graph): {floor * 1e3:.2f} ms ({limit / floor:.0%} of the limit's rate)",
            ]
            for compile in (value.strip() == "true" for value in args.compile.split(",")):
                recipe = fast_recipe(args.recipe, compile)
                with lcpatch.patched(model, recipe):
                    step = stepper(model, ids)
                    seconds = timed(step, args.steps)
                    rows, kernel_us = kernels(step, args.steps)
                measured = measure(model, recipe, ids, args.steps)
                rate = measured["decode_tokens_per_s"]
                launches = sum(r[1] for r in rows)
                row[f"compile={compile}"] = {
                    "graph_step_s": seconds,
                    "generate": measured,
                    "kernel_us": kernel_us,
                    "launches": launches,
                    "kernels": rows[:40],
                }
                lines += [
                    "",
                    f"### generation.compile {str(compile).lower()}",
                    f"captured step, called directly: {seconds * 1e3:.2f} ms per token ({limit / seconds:.0%} of the "
                    f"limit's rate); inside generate(): {rate:.1f} tokens/s per sequence ({rate * limit:.0%})",
                    f"kernels in one replay: {launches:.0f} launches, {kernel_us / 1e3:.2f} ms of kernel time",
                    "",
                    *table(rows),
                ]
            result["batches"][batch] = row
            del step, ids
            torch.cuda.empty_cache()
    stem = args.out / f"profile-{name}-{args.length}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
