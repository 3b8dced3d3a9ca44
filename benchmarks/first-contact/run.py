"""What a new user waits for on a CPU: generate() after a long prompt, and one layer's Λ attention by engine.

    python benchmarks/first-contact/run.py --out benchmarks/first-contact/results.json

1. The quickstart: SmolLM2-135M-Instruct, the first 12,288 tokens of Moby Dick as the prompt, 20 new
   tokens (greedy), vanilla and lm-infinite; wall time of each generate() and the text it wrote.
2. One attention layer of SmolLM2's shape (9 query / 3 KV heads, D = 64, fp32, window 8,192, 10 global
   tokens) over a 16k-token prefill in 1,024-token passes, as the demo runs it: dense causal SDPA (what
   vanilla runs), lcpatch's torch backend (the SDPA split) and the per-pair reference (the spec; only
   it is slow: `--reference-tokens` limits it).
The README's first command (`lcpatch demo`) prints its own wall times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lcpatch
from lcpatch.cli.common import environment
from lcpatch.demo.smollm2 import load_smollm2
from lcpatch.kernels.lambda_reference import lambda_attention_reference
from lcpatch.kernels.lambda_split import lambda_attention_split
from lcpatch.kernels.specs import LambdaSpec, Rotary

BOOK = Path(__file__).resolve().parents[3] / "shared" / "data" / "gutenberg" / "melville-moby_dick.txt"


def quickstart(prompt_tokens: int, new_tokens: int) -> dict:
    model, tokenizer = load_smollm2()
    text = BOOK.read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :prompt_tokens]
    results = {}
    for name in ("vanilla", "lm-infinite"):
        with lcpatch.patched(model, name) if name != "vanilla" else contextlib.nullcontext():
            began = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            seconds = time.perf_counter() - began
        results[name] = {"seconds": round(seconds, 1), "text": tokenizer.decode(out[0, ids.shape[1] :])}
        print(f"quickstart {name}: {seconds:.1f} s: {results[name]['text']!r}", flush=True)
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "results": results}


def attention_layer(tokens: int, pass_tokens: int, reference_tokens: int) -> dict:
    """Seconds for one layer's attention over a prefill of `tokens` in passes of `pass_tokens`."""
    torch.manual_seed(0)
    q_heads, kv_heads, dim = 9, 3, 64
    query = torch.randn(1, q_heads, tokens, dim)
    key, value = torch.randn(1, kv_heads, tokens, dim), torch.randn(1, kv_heads, tokens, dim)
    positions, valid = torch.arange(tokens)[None], torch.ones(1, tokens, dtype=torch.bool)
    rotary = Rotary(1.0 / (100000.0 ** (torch.arange(0, dim, 2).float() / dim)))
    spec, scaling = LambdaSpec(10, 8192, 8192), dim**-0.5

    def dense(start, stop):
        # transformers' SDPA path for a pass over the cache: the pass's queries against every earlier key.
        mask = torch.ones(stop - start, stop, dtype=torch.bool).tril(start)
        q = query[:, :, start:stop]
        return F.scaled_dot_product_attention(q, key[:, :, :stop], value[:, :, :stop], attn_mask=mask, enable_gqa=True)

    def windowed(engine):
        def run(start, stop):
            # The bounded cache holds the sinks and the last `window` keys before the pass.
            first = max(0, start - spec.window)
            slots = torch.cat((torch.arange(min(first, spec.n_global)), torch.arange(first, stop)))
            args = (query[:, :, start:stop], key[:, :, slots], value[:, :, slots])
            return engine(*args, positions[:, start:stop], positions[:, slots], valid[:, slots], spec, rotary, scaling)

        return run

    engines = {
        "dense SDPA (vanilla)": (dense, tokens),
        "lcpatch torch backend (SDPA split)": (windowed(lambda_attention_split), tokens),
        "per-pair reference": (windowed(lambda_attention_reference), reference_tokens),
    }
    results = {}
    with torch.no_grad():
        for name, (run, length) in engines.items():
            began = time.perf_counter()
            for start in range(0, length, pass_tokens):
                run(start, min(length, start + pass_tokens))
            seconds = time.perf_counter() - began
            results[name] = {"tokens": length, "seconds": round(seconds, 2)}
            print(f"attention {name}: {length} tokens in {seconds:.2f} s", flush=True)
    return {"tokens": tokens, "pass_tokens": pass_tokens, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompt-tokens", type=int, default=12288)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--attention-tokens", type=int, default=16384)
    parser.add_argument("--reference-tokens", type=int, default=16384)
    args = parser.parse_args()
    report = {
        "environment": environment("cpu"),
        "command": "python benchmarks/first-contact/run.py --out " + str(args.out),
        "attention_layer": attention_layer(args.attention_tokens, 1024, args.reference_tokens),
        "quickstart": quickstart(args.prompt_tokens, args.new_tokens),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
