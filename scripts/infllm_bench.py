"""InfLLM speed and memory on a Llama-3-8B-shaped random model (bf16): prefill time, peak GPU memory, decode rate.

Each method runs one `model.generate()` of 1 + --new-tokens tokens on a random prompt of --length
tokens; a streamer timestamps every token, so prefill time (prompt in to first token out) and decode
tokens/s come from the same call, as a user would see them.

    python scripts/infllm_bench.py --length 131072 --methods dense,infllm-gpu,infllm-cpu --out bench.json
    python scripts/infllm_bench.py --length 1048576 --methods infllm-cpu --new-tokens 8 --out bench-1m.json

Methods: dense (vanilla transformers, SDPA, one prefill pass), dense-chunked (vanilla, prefill in
chunks of 8192), infllm-gpu / infllm-cpu (recipe `infllm`, memory blocks on the GPU / in pinned CPU
memory). Peak memory is torch's max_memory_allocated, also given beyond the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

import lcpatch

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
RECIPES = {
    "dense": None,
    "dense-chunked": None,
    "infllm-gpu": {"attention": {"method": "infllm", "offload": "gpu"}},
    "infllm-cpu": {"attention": {"method": "infllm", "offload": "cpu"}},
}


class Clock(BaseStreamer):
    """Times (s, after a device sync) at which generate() hands out the prompt and each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run(model, method: str, length: int, new_tokens: int, seed: int) -> dict:
    """One generate() call under `method`; returns its timings and memory."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(model.device)
    recipe = RECIPES[method]
    scope = contextlib.nullcontext() if recipe is None else lcpatch.patched(model, recipe)
    chunk = {"prefill_chunk_size": 8192} if method == "dense-chunked" else {}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    clock = Clock()
    with scope, torch.no_grad():
        described = lcpatch.describe(model)
        start = time.perf_counter()
        model.generate(
            ids, max_new_tokens=1 + new_tokens, min_new_tokens=1 + new_tokens, do_sample=False, streamer=clock, **chunk
        )
    first, last = clock.times[1], clock.times[-1]
    return {
        "method": method,
        "length": length,
        "recipe": described,
        "prefill_s": first - start,
        "decode_tokens_per_s": (len(clock.times) - 2) / (last - first) if len(clock.times) > 2 else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--methods", default="dense,infllm-gpu,infllm-cpu", help=", ".join(RECIPES))
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed after the first token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="results JSON (rewritten after every method)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(LlamaConfig(**LLAMA3_8B), dtype=torch.bfloat16).eval()
    weights = torch.cuda.memory_allocated() / 2**30
    results = {
        "environment": {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "triton": _triton_version(),
            "dtype": "bfloat16",
            "model": "Llama-3-8B shape, random weights",
            "weights_gib": weights,
        },
        "args": vars(args),
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        try:
            result = run(model, method, args.length, args.new_tokens, args.seed)
            result["peak_beyond_weights_gib"] = result["peak_gib"] - weights
        except torch.OutOfMemoryError as exc:
            result = {"method": method, "length": args.length, "error": f"out of memory: {exc}"}
        results["runs"].append(result)
        out.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "recipe"}), flush=True)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
