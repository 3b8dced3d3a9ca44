"""Training tokens/s of the dense-attention recipes: SDPA as today against FlashAttention-4 with padding-free packing.

For a SmolLM2-135M-shaped and a Llama-3.2-1B-shaped model (random weights built from their configs: speed depends
on the shape only), each mode times training steps — forward, backward and AdamW step; LoRA r = 16 on q/k/v/o like
the shipped recipes; bf16; batch 1 row of L tokens — at L = 4k, 8k, 16k:

- sdpa: the model's SDPA attention on a 'wrapped' row (the token stream cut into equal blocks, attending across
  documents), what `lcpatch train` does on SDPA;
- flash-packed: `attention: {method: dense, backend: flash}` on a padding-free row of variable-length documents
  (lengths drawn from a fixed seed), position ids restarting per document (`lcpatch.training.packing`), what
  `lcpatch train` does on flash attention;
- flash-wrapped: flash attention on the wrapped row (the kernel's speed-up alone);
- sdpa-packed: SDPA on the padding-free row, documents kept apart by the block mask transformers builds from the
  position ids (why SDPA keeps wrapped rows).

Checks next to the timings: the loss of the packed row on flash against SDPA (same weights), and one decode step's
logits on flash against SDPA (dense `auto` uses flash attention at inference too). A mode that fails for a shape
(flash-attn-4 missing, an unsupported shape, out of memory) is recorded with its error and the run goes on; past
--budget-s seconds the remaining measurements are skipped.

    python3 benchmarks/flash-training/run.py --out $OUT/flash-training          # on the GPU machine (no downloads)
    python3 benchmarks/flash-training/run.py --tiny --out /tmp/flash-training   # CPU check of the script (toy sizes)

With LCPATCH_FA4_SITE set, that folder is added as a site directory first (flash-attn-4 installed there). Writes
results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import site
import sys
import time
from importlib import metadata
from pathlib import Path

if os.environ.get("LCPATCH_FA4_SITE"):  # before torch and transformers look for flash_attn
    site.addsitedir(os.environ["LCPATCH_FA4_SITE"])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import lcpatch  # noqa: E402
from lcpatch._compat import CACHE_ARG  # noqa: E402
from lcpatch.api import patched_recipe  # noqa: E402
from lcpatch.bench.presets import preset_config, tiny_model  # noqa: E402
from lcpatch.cli.common import environment  # noqa: E402
from lcpatch.training.packing import PaddingFreeCollator  # noqa: E402

SHAPES = ("smollm2-135m", "llama3.2-1b")
MODES = ("sdpa", "flash-packed", "flash-wrapped", "sdpa-packed")  # in the order measured: the comparison first
FLASH = {"attention": {"method": "dense", "backend": "flash"}}


def document_lengths(length: int, seed: int) -> list[int]:
    """Lengths of documents filling `length` tokens: log-normal around length / 8, at least 128 tokens."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < length:
        lengths.append(int(np.clip(rng.lognormal(np.log(length / 8), 1.0), 128, length)))
    lengths[-1] -= sum(lengths) - length
    return [n for n in lengths if n > 0]


def batches(length: int, vocab: int, device, seed: int = 0) -> dict[str, dict]:
    """The row of `length` random tokens, wrapped (one block) and packed padding-free (its documents apart)."""
    ids = torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))
    packed = PaddingFreeCollator()([{"input_ids": ids, "sequence_lengths": document_lengths(length, seed)}])
    wrapped = {"input_ids": ids[None], "labels": ids[None].clone()}
    move = lambda batch: {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    return {"wrapped": move(wrapped), "packed": move(packed)}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(model, optimizer, batch: dict, warmup: int, steps: int, device) -> float:
    def step():
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):  # the first flash steps compile its kernels
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def on_flash(model, mode: str) -> bool:
    """Switch the model to the mode's attention (lcpatch's dense recipe, flash backend) or back to its own."""
    if patched_recipe(model) is not None:
        lcpatch.remove(model)
    if mode.startswith("flash"):
        lcpatch.apply(model, FLASH)
        return True
    return False


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def checks(model, batch: dict, vocab: int, device) -> dict:
    """Flash against SDPA on the same weights: the packed row's loss, and one decode step's logits after a prompt."""
    prompt = torch.randint(3, vocab, (1, 256), generator=torch.Generator().manual_seed(1)).to(device)
    found = {}
    with torch.no_grad():
        for mode in ("sdpa", "flash"):
            on_flash(model, mode)
            loss = model(**batch, use_cache=False).loss.float().item()
            out = model(input_ids=prompt[:, :-1], use_cache=True)
            step = model(input_ids=prompt[:, -1:], **{CACHE_ARG: out.past_key_values}, use_cache=True)
            found[mode] = (loss, step.logits[0, -1].float())
    on_flash(model, "sdpa")
    (sdpa_loss, sdpa_logits), (flash_loss, flash_logits) = found["sdpa"], found["flash"]
    return {
        "packed_loss_sdpa": sdpa_loss,
        "packed_loss_flash": flash_loss,
        "decode_logits_max_abs_diff": (flash_logits - sdpa_logits).abs().max().item(),
        "decode_logits_scale": sdpa_logits.abs().max().item(),
    }


def run_shape(name: str, args, device, dtype, deadline: float) -> dict:
    config = tiny_model().config if name == "tiny" else preset_config(name)
    config._attn_implementation = "sdpa"
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model = get_peft_model(
        base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    rows, result = [], {}
    for length in args.lengths:
        data = batches(length, config.vocab_size, device)
        row = {"length": length, "documents": len(data["packed"]["cu_seq_lens_q"]) - 1}
        for mode in args.modes:
            if time.perf_counter() > deadline:
                row[mode] = {"skipped": "time budget"}
                continue
            try:
                on_flash(model, mode)
                batch = data["packed" if mode.endswith("packed") else "wrapped"]
                seconds = seconds_per_step(model, optimizer, batch, args.warmup, args.steps, device)
                row[mode] = {"tokens_per_s": length / seconds, "ms_per_step": 1000 * seconds}
                print(f"  {name} {length:>6} {mode:<14} {length / seconds:10.0f} tok/s", flush=True)
            except Exception as exc:  # recorded; the other modes and shapes still run
                row[mode] = {"error": error_text(exc)}
                print(f"  {name} {length:>6} {mode:<14} failed: {row[mode]['error']}", flush=True)
            finally:
                on_flash(model, "sdpa")
                optimizer.zero_grad(set_to_none=True)
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
    if time.perf_counter() < deadline:
        try:
            model.eval()
            result["checks"] = checks(
                model, batches(args.lengths[0], config.vocab_size, device)["packed"], config.vocab_size, device
            )
            print(f"  {name} checks: {result['checks']}", flush=True)
        except Exception as exc:
            result["checks"] = {"error": error_text(exc)}
            print(f"  {name} checks failed: {result['checks']['error']}", flush=True)
    result["rows"] = rows
    del model, base, optimizer
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return result


def flash_version() -> str | None:
    try:
        return metadata.version("flash-attn-4")
    except metadata.PackageNotFoundError:
        return None


def cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    if "tokens_per_s" in entry:
        return f"{entry['tokens_per_s']:,.0f}"
    return "skipped" if "skipped" in entry else "error"


def markdown(meta: dict, results: dict, modes: list[str]) -> str:
    lines = [
        f"Training tokens/s, dense attention: SDPA vs FlashAttention-4 ({meta['device']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, flash-attn-4 {meta['flash_attn_4']}, {meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
        "Batch 1 row of L tokens, LoRA r=16 on q/k/v/o, AdamW, bf16; forward + backward + optimizer step.",
        "",
        "| model | L | documents | " + " | ".join(f"{mode} tok/s" for mode in modes) + " | flash-packed / sdpa |",
        "|---|---:|---:|" + "---:|" * len(modes) + "---:|",
    ]
    for shape, result in results.items():
        for row in result["rows"]:
            sdpa, flash = row.get("sdpa", {}), row.get("flash-packed", {})
            ratio = (
                f"{flash['tokens_per_s'] / sdpa['tokens_per_s']:.2f}x"
                if "tokens_per_s" in sdpa and "tokens_per_s" in flash
                else "-"
            )
            cells = " | ".join(cell(row.get(mode)) for mode in modes)
            lines.append(f"| {shape} | {row['length']} | {row['documents']} | {cells} | {ratio} |")
    errors = [
        f"- {shape}, L={row['length']}, {mode}: {row[mode]['error']}"
        for shape, result in results.items()
        for row in result["rows"]
        for mode in modes
        if "error" in row.get(mode, {})
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    lines += ["", "Checks (flash against SDPA, same weights):"]
    lines += [
        f"- {shape}: {json.dumps(result.get('checks', 'not run (time budget)'))}" for shape, result in results.items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement (flash compiles here)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip the measurements left after this")
    parser.add_argument("--tiny", action="store_true", help="a toy model on CPU, lengths 256/512: checks the script")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = ["tiny"] if args.tiny else args.shapes
    if args.tiny:
        args.lengths, args.warmup, args.steps = [256, 512], 1, 1
    meta = {
        **environment(device),
        "flash_attn_4": flash_version(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"flash-training: {meta['device']}, flash-attn-4 {meta['flash_attn_4']}", flush=True)
    results = {}
    for name in shapes:
        print(name, flush=True)
        results[name] = run_shape(name, args, device, dtype, started + args.budget_s)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / "results.md").write_text(markdown(meta, results, args.modes))
    print(markdown(meta, results, args.modes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
