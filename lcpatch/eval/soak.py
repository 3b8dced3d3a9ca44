"""Soak test: stream a very long generation through a patched model and sample its memory.

    python -m lcpatch.eval.soak --tokens 1000000 --recipe lm-infinite --out soak.json

With --chunk 1 (the default) the loop samples one token at a time and feeds it back into the
model's own bounded cache, so the cache, the attention and the hooks are what is measured
(transformers' generate() also grows a full-length attention mask each step, which a
million-token stream should not pay for). With --chunk N > 1 it streams N random tokens per
forward pass: the same cache path, a million tokens in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lcpatch
from lcpatch._compat import CACHE_ARG
from lcpatch.bench.presets import tiny_model
from lcpatch.bench.timing import resident_mib
from lcpatch.cli.common import environment


@torch.no_grad()
def soak(
    model, tokens: int, recipe: str = "lm-infinite", chunk: int = 1, samples: int = 100, device: str = "cpu"
) -> dict:
    lcpatch.apply(model, recipe)
    cache = lcpatch.make_cache(model)
    vocab = model.config.vocab_size
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    steps = tokens // chunk
    every = max(1, steps // samples)
    series, start = [], time.perf_counter()
    for step in tqdm(range(steps), desc="soak", unit=f"x{chunk} tok", mininterval=2.0):
        if chunk == 1:
            logits = model(token, **{CACHE_ARG: cache}).logits[:, -1].float()
            token = torch.multinomial(torch.softmax(logits, -1), 1)
        else:
            model.model(torch.randint(0, vocab, (1, chunk), device=device), **{CACHE_ARG: cache})
        if step % every == 0 or step == steps - 1:
            gpu = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else None
            series.append(
                {
                    "token": (step + 1) * chunk,
                    "rss_mib": round(resident_mib(), 1),
                    "gpu_mib": gpu,
                    "cache_positions": max(cache.stored_lengths()),
                }
            )
    elapsed = time.perf_counter() - start
    warm = series[len(series) // 10]["rss_mib"]
    return {
        "recipe": lcpatch.describe(model),
        "tokens": steps * chunk,
        "tokens_per_forward": chunk,
        "seconds": round(elapsed, 1),
        "tokens_per_second": round(steps * chunk / elapsed, 1),
        "rss_after_warmup_mib": warm,
        "rss_final_mib": series[-1]["rss_mib"],
        "rss_growth_after_warmup_mib": round(series[-1]["rss_mib"] - warm, 1),
        "max_cache_positions": max(s["cache_positions"] for s in series),
        "seen_tokens": cache.get_seq_length(),
        "environment": environment(device),
        "series": series,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--recipe", default="lm-infinite")
    parser.add_argument("--chunk", type=int, default=1, help="tokens per forward (1: sampled decode)")
    parser.add_argument("--out", type=Path, default=Path("soak.json"))
    args = parser.parse_args(argv)
    # 256 positions: the training length, which the recipes' windows default to.
    model = tiny_model("llama", vocab_size=256, intermediate_size=128, max_position_embeddings=256)
    result = soak(model, args.tokens, args.recipe, args.chunk)
    args.out.write_text(json.dumps(result, indent=1))
    print({k: v for k, v in result.items() if k not in ("series", "recipe")})


if __name__ == "__main__":
    main()
