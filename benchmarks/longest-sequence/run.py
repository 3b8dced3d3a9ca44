"""Longest trainable sequence on one GPU, with and without lcpatch's memory savings.

For a SmolLM2-135M-shaped and a Llama-3.2-1B-shaped model (random weights built from their configs: memory
and speed do not depend on the weights), each setting trains batch-1 sequences of doubling length — LoRA
r = 16 on q/k/v/o like the shipped recipes, AdamW, the model's own next-token loss, bf16 on CUDA — until
the GPU runs out of memory, and records per length the tokens/s and the peak memory:

- baseline: dense sdpa attention, no gradient checkpointing;
- checkpointing: + gradient checkpointing (training.gradient_checkpointing);
- checkpointing+lambda: + Λ attention (lm-infinite) with lcpatch's Triton training kernels.

The LM head's logits (length x vocab, fp32 in the loss) are part of what bounds the length, as in `lcpatch train`.

    python benchmarks/longest-sequence/run.py --out $OUT/longest            # on the GPU machine (no downloads)
    python benchmarks/longest-sequence/run.py --tiny --out /tmp/longest     # CPU check of the script (toy sizes)

Writes results.json and results.md to --out. Multi-GPU (DDP / ZeRO-3 / ZeRO-3 + SP) runs go through
`accelerate launch --config_file recipes/accelerate/...` with `lcpatch train` (README, "Multi-GPU training").
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

import lcpatch
from lcpatch.bench.presets import preset_config
from lcpatch.cli.common import environment

# Shapes from lcpatch.bench.presets.PRESETS (random weights: memory and speed depend on the shape only).
SHAPES = ("smollm2-135m", "llama3.2-1b")
SETTINGS = {
    "baseline": dict(recipe=None, checkpointing=False),
    "checkpointing": dict(recipe=None, checkpointing=True),
    "checkpointing+lambda": dict(recipe={"attention": {"method": "lm-infinite"}}, checkpointing=True),
}


def build(shape: str, setting: dict, device: str, dtype: torch.dtype):
    config = preset_config(shape)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if setting["recipe"] is not None:
        lcpatch.apply(model, setting["recipe"])
    if setting["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # LoRA: the frozen embeddings would cut the checkpointed graph
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model.train(), optimizer


def train_steps(model, optimizer, length: int, steps: int, device: str, vocab: int) -> float:
    """Seconds per step over `steps` steps of one `length`-token sequence (after one warm-up step)."""
    ids = torch.randint(0, vocab, (1, length), device=device)

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def longest(shape: str, setting: dict, args, device: str, dtype: torch.dtype) -> list[dict]:
    """Rows {length, tokens_per_s, peak_gib} for doubling lengths; the last has oom: true if one was hit."""
    model, optimizer = build(shape, setting, device, dtype)
    rows, length = [], args.start
    while length <= args.max_length:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = train_steps(model, optimizer, length, args.steps, device, model.config.vocab_size)
        except torch.OutOfMemoryError:
            rows.append({"length": length, "oom": True})
            break
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        rows.append({"length": length, "tokens_per_s": length / seconds, "peak_gib": peak})
        memory = "" if peak is None else f", peak {peak:.2f} GiB"
        print(f"  {length:>8} tokens: {length / seconds:10.0f} tok/s{memory}")
        length *= 2
    del model, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(results: dict, device_name: str) -> str:
    lines = [
        f"Longest trainable sequence, batch 1, LoRA r=16, AdamW ({device_name})",
        "",
        "| model | setting | longest trained | tokens/s there | peak GiB there | first OOM |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape, settings in results.items():
        for setting, rows in settings.items():
            trained = [row for row in rows if not row.get("oom")]
            best = trained[-1] if trained else {}
            oom = next((row["length"] for row in rows if row.get("oom")), "none (cap)")
            peak = best.get("peak_gib")
            lines.append(
                f"| {shape} | {setting} | {best.get('length', '-')} | {best.get('tokens_per_s', 0):.0f} | "
                f"{'-' if peak is None else f'{peak:.1f}'} | {oom} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--start", type=int, default=2048, help="first length (doubled each round)")
    parser.add_argument("--max-length", type=int, default=2**20, help="stop doubling past this (no OOM reached)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per length (after one warm-up step)")
    parser.add_argument("--tiny", action="store_true", help="a toy model on CPU, lengths 16..128: checks the script")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = ["tiny"] if args.tiny else args.shapes
    if args.tiny:
        args.start, args.max_length, args.steps = 16, 128, 1
    results = {}
    for name in shapes:
        results[name] = {}
        for setting in args.settings:
            print(f"{name} / {setting}")
            results[name][setting] = longest(name, SETTINGS[setting], args, device, dtype)
    meta = environment(device)
    device_name = meta["device"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / "results.md").write_text(markdown(results, device_name))
    print(markdown(results, device_name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
