"""Where an InfLLM decode step's time goes: kernels of --steps fixed-shape steps under torch.profiler (CUDA GPU).

    python benchmarks/infllm-prefill/profile_decode.py --layers 32 --length 131072 --out profile-decode.txt

Llama-3-8B shape with random bf16 weights, memory blocks on the GPU, after a --length prompt. The steps
run the graph's own step uncaptured (generation.decode: static), so the profiler sees every kernel; the
captured step's wall time per token (generation.decode: graph) is written first, for comparison.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from profile_prefill import report  # beside this script
from torch.profiler import ProfilerActivity, profile

import lcpatch
from lcpatch._compat import CACHE_ARG
from lcpatch.bench.presets import load_model


def recipe(decode: str) -> dict:
    return {"attention": {"method": "infllm", "offload": "gpu"}, "generation": {"decode": decode}}


def steps(model, ids: torch.Tensor, count: int) -> tuple[float, Callable[[], None]]:
    """Prefill `ids`, then time `count` single-token steps; returns seconds per step and the step."""
    out = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache, token = out.past_key_values, out.sequences[:, -1:]
    position = ids.shape[1]

    def step():
        nonlocal position
        positions = torch.full_like(token, position)
        model(input_ids=token, position_ids=positions, **{CACHE_ARG: cache})
        position += 1

    step()  # captures the graph (or warms up)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / count, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, described, _ = load_model("llama3-8b", args.layers, torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device="cuda")
    lines = [f"{described}; {args.length} tokens; {torch.cuda.get_device_name()}; torch {torch.__version__}"]
    with torch.no_grad():
        for decode in ("graph", "static"):
            with lcpatch.patched(model, recipe(decode)):
                seconds, step = steps(model, ids, args.steps)
                lines.append(f"{decode}: {seconds * 1000:.2f} ms per token ({1 / seconds:.1f} tokens/s)")
                if decode == "static":
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(args.steps):
                            step()
                        torch.cuda.synchronize()
    lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    report(lines, args.out)


if __name__ == "__main__":
    main()
