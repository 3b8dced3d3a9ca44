"""Where an InfLLM prefill's time goes: one `generate()` of one token under torch.profiler (CUDA GPU).

    python benchmarks/infllm-prefill/profile_prefill.py --layers 4 --length 131072 --out profile.txt

Llama-3-8B shape with random bf16 weights (`lcpatch bench`'s preset), the first --layers layers, memory
blocks kept on the GPU. Writes the prefill's wall time per layer, and the CUDA kernels and the CPU-side
operators that take the most time, to --out (and stdout).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import lcpatch
from lcpatch.bench.presets import load_model
from lcpatch.bench.timing import prefill_seconds

RECIPE = {"attention": {"method": "infllm", "offload": "gpu"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--recipe", default=None, help="a recipe name or YAML path (default: infllm, blocks on GPU)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model, described, _ = load_model("llama3-8b", args.layers, torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device="cuda")
    lines = [f"{described}; {args.length} tokens; {torch.cuda.get_device_name()}; torch {torch.__version__}"]
    with torch.no_grad(), lcpatch.patched(model, args.recipe or RECIPE):
        prefill_seconds(model, ids[:, :8192])  # compile kernels, grow the allocator
        seconds = prefill_seconds(model, ids)
        lines.append(f"prefill {seconds:.3f} s, {seconds / args.layers * 1000:.1f} ms per layer (MLP included)")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            prefill_seconds(model, ids)
    averages = prof.key_averages()
    lines.append(averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    report(lines, args.out)


def report(lines: list[str], out: str) -> None:
    """Print the lines and write them to `out`."""
    text = "\n".join(lines)
    print(text)
    with open(out, "w") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
