"""`lcpatch eval`: long-context quality of one model under several recipes, in one resumable run.

    lcpatch eval --model smollm2 --recipes vanilla,lm-infinite --task ppl --lengths 16k --bucket 2048 \\
        --text book.txt --out runs/ppl
    lcpatch eval --model ./my-model --recipes vanilla,infllm --task passkey --lengths 1k,4k \\
        --depths 0,0.5,1 --samples 5 --text book.txt --out runs/passkey

Tasks:
  ppl      perplexity by position bucket of the first max(--lengths) tokens of --text, one cell per recipe;
  passkey  a 5-digit key hidden at each --depths of a haystack of --text, one cell per (recipe, length,
           depth); greedy generation; a sample is correct when the first number generated (spaces ignored)
           is the key;
  needle   a sentence needle ("The special magic word for Paris is harbor.") with a question; correct when
           the generation, normalised (lower case, no punctuation), starts with the answer word.

Output in --out: results.json, plots (ppl.png, or <task>.png: one accuracy heatmap lengths × depths per
recipe), and a compact table printed at the end. results.json schema (version 1):

    {"schema": 1, "task": str, "model": str, "recipes": [str], "settings": {...},
     "records": [{"recipe": str, "length": int, "depth": float | null, "seconds": float,
                  ppl: "buckets": [{start, end, tokens, nll, ppl}], "overall": {tokens, nll, ppl};
                  passkey/needle: "accuracy": float, "samples": int,
                  "answers": [{"expected": str, "answer": str, "correct": bool}]}]}

A rerun with the same --out skips the cells already in results.json (it is rewritten after every cell),
so an interrupted run resumes; the settings must match. Seeds are derived from --seed and the cell, so a
cell's prompts do not depend on which other cells run. When the tokenizer has a chat template, the prompt
is wrapped as one user message followed by the assistant's answer prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cli.common import (
    MISSING,
    VANILLA,
    format_table,
    parse_lengths,
    parse_recipes,
    pyplot,
    resolve_device,
    resolve_dtype,
)
from ..cli.eval import SMOLLM2, add_arguments
from ..data import load_texts
from ..data.documents import local_files
from ..data.tokens import encode
from ..errors import LcpatchError, run_reporting_errors
from .passkey import build_prompt, greedy_answers, passkey_prompt, random_key, score_passkey
from .perplexity import perplexity_by_position

logger = logging.getLogger(__name__)

TASKS = ("ppl", "passkey", "needle")
SCHEMA = 1
RESULTS = "results.json"
NEEDLE = (
    "\nThe special magic word for {city} is {word}.\n",
    "\nWhat is the special magic word for {city}?",
    "The special magic word for {city} is",
)
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Hanoi", "Quito", "Dakar", "Perth", "Kyoto", "Porto"]
WORDS = ["harbor", "violet", "lantern", "granite", "meadow", "falcon", "copper", "willow", "saffron", "glacier"]
MAX_NEW_TOKENS = {"passkey": 8, "needle": 8}


# --- arguments --------------------------------------------------------------------------------------------


def parse_depths(spec: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; each in [0, 1] (0 = needle at the start of the haystack, 1 = at its end)."""
    depths = []
    for part in (p.strip() for p in spec.split(",")):
        try:
            depth = float(part)
        except ValueError:
            depth = -1.0
        if not 0.0 <= depth <= 1.0:
            raise LcpatchError(f"--depths: {part!r} is not a depth in [0, 1]; give e.g. '0,0.5,1'.")
        depths.append(depth)
    if len(set(depths)) != len(depths):
        raise LcpatchError(f"--depths names a depth twice: {spec!r}.")
    return depths


@dataclass
class Plan:
    task: str
    model: str
    recipes: list[str]
    lengths: list[int]
    depths: list[float]
    samples: int
    text: str
    text_config: str | None
    text_field: str
    out: Path
    bucket: int
    chunk: int
    seed: int

    def settings(self) -> dict:
        settings = {"lengths": self.lengths, "seed": self.seed, "text": Path(self.text).name}
        if self.task == "ppl":
            return {**settings, "bucket": self.bucket}
        return {**settings, "depths": self.depths, "samples": self.samples, "max_new_tokens": MAX_NEW_TOKENS[self.task]}

    def cells(self) -> list[tuple[str, int, float | None]]:
        if self.task == "ppl":
            return [(recipe, max(self.lengths), None) for recipe in self.recipes]
        return [(r, length, depth) for r in self.recipes for length in self.lengths for depth in self.depths]


def make_plan(args: argparse.Namespace) -> Plan:
    """Every argument checked, before any model is loaded."""
    if args.task not in TASKS:
        raise LcpatchError(f"--task {args.task!r} is not a task; accepted: {', '.join(TASKS)}.")
    for name in ("samples", "bucket", "chunk"):
        if getattr(args, name) < 1:
            raise LcpatchError(f"--{name} must be a positive integer; got {getattr(args, name)}.")
    local_files(args.text, source="--text")  # a path that matches nothing fails now, not after loading
    if args.model != SMOLLM2 and not Path(args.model).is_dir():
        raise LcpatchError(
            f"--model {args.model!r} is neither a local model folder (config.json, weights, tokenizer) nor '{SMOLLM2}'."
        )
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise LcpatchError(f"--dtype {args.dtype!r}: accepted are auto, float32, bfloat16, float16.")
    if args.out.exists() and not args.out.is_dir():
        raise LcpatchError(f"--out {str(args.out)!r} exists and is not a folder.")
    return Plan(
        task=args.task,
        model=SMOLLM2 if args.model == SMOLLM2 else Path(args.model).resolve().name,
        recipes=parse_recipes(args.recipes),
        lengths=parse_lengths(args.lengths),
        depths=parse_depths(args.depths),
        samples=args.samples,
        text=args.text,
        text_config=args.text_config,
        text_field=args.text_field,
        out=args.out,
        bucket=args.bucket,
        chunk=args.chunk,
        seed=args.seed,
    )


# --- prompts and scoring ----------------------------------------------------------------------------------


def make_sample(task: str, tokenizer, haystack: list[int], length: int, depth: float, rng) -> tuple[list[int], str]:
    """(prompt ids, expected answer) of one passkey or needle sample."""
    if task == "passkey":
        key = random_key(rng)
        return passkey_prompt(tokenizer, haystack, length, depth, key, rng), key
    city, word = rng.choice(CITIES), rng.choice(WORDS)
    needle, question, prefix = (p.format(city=city, word=word) for p in NEEDLE)
    return build_prompt(tokenizer, haystack, length, depth, needle, question, prefix, rng), word


def _normalise(text: str) -> list[str]:
    return text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation))).split()


def score_needle(generated: str, answer: str) -> bool:
    """Correct when the generation, lower-cased without punctuation, starts with exactly the answer's words."""
    words, expected = _normalise(generated), _normalise(answer)
    return bool(expected) and words[: len(expected)] == expected


SCORERS = {"passkey": score_passkey, "needle": score_needle}


# --- cells ------------------------------------------------------------------------------------------------


def cell_rng(seed: int, task: str, length: int, depth: float | None) -> random.Random:
    """A generator seeded by the cell alone (string seeds are hashed deterministically)."""
    return random.Random(f"{seed}/{task}/{length}/{depth}")


@torch.no_grad()
def evaluate_cell(plan: Plan, model, tokenizer, text_ids: list[int], length: int, depth: float | None, desc: str):
    """The measurement of one cell, for the model as it is now (patched or not): a record without `recipe`."""
    if plan.task == "ppl":
        ids = torch.tensor(text_ids[:length])
        return perplexity_by_position(model, ids, bucket=plan.bucket, chunk=plan.chunk, progress=False, desc=desc)
    rng = cell_rng(plan.seed, plan.task, length, depth)
    answers = []
    for _ in range(plan.samples):
        prompt, expected = make_sample(plan.task, tokenizer, text_ids, length, depth, rng)
        (text,) = greedy_answers(model, tokenizer, [prompt], MAX_NEW_TOKENS[plan.task])
        answers.append({"expected": expected, "answer": text, "correct": SCORERS[plan.task](text, expected)})
    accuracy = sum(a["correct"] for a in answers) / len(answers)
    return {"accuracy": accuracy, "samples": len(answers), "answers": answers}


def _key(recipe: str, length: int, depth: float | None) -> tuple:
    return (recipe, length, depth)


def load_results(plan: Plan) -> dict:
    """The results so far in --out (checked against this run's settings), or an empty results document."""
    fresh = {"schema": SCHEMA, "task": plan.task, "model": plan.model, "recipes": plan.recipes}
    fresh |= {"settings": plan.settings(), "records": []}
    path = plan.out / RESULTS
    if not path.is_file():
        return fresh
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LcpatchError(f"{str(path)!r} is not valid JSON ({exc}); remove it or use another --out.") from exc
    for field in ("schema", "task", "model", "settings"):
        if old.get(field) != fresh[field]:
            raise LcpatchError(
                f"{str(path)!r} holds a different run ({field}: {old.get(field)!r}, now {fresh[field]!r}); "
                "use another --out to start a new one."
            )
    fresh["recipes"] = old["recipes"] + [r for r in plan.recipes if r not in old["recipes"]]
    fresh["records"] = old["records"]
    return fresh


def save_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / (RESULTS + ".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(out / RESULTS)


def load_model(name: str, device: torch.device, dtype: torch.dtype, gguf: Path | None):
    """(model in eval mode, tokenizer) from a local folder or the SmolLM2 GGUF loader."""
    if name == SMOLLM2:
        from ..demo import smollm2

        return smollm2.load_smollm2(dtype=dtype, device=device, gguf_path=gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(name)


def read_text_ids(tokenizer, plan: Plan) -> list[int]:
    documents = load_texts((plan.text,), plan.text_config, plan.text_field, source="--text")
    ids = encode(tokenizer, "\n\n".join(documents))
    need = max(plan.lengths)
    if plan.task == "ppl" and len(ids) < need:
        raise LcpatchError(f"--text {plan.text!r} has only {len(ids)} tokens, fewer than the longest --lengths {need}.")
    if not ids:
        raise LcpatchError(f"--text {plan.text!r} holds no tokens.")
    return ids


# --- report -----------------------------------------------------------------------------------------------


def _records(results: dict, recipe: str) -> list[dict]:
    return [r for r in results["records"] if r["recipe"] == recipe]


def accuracy_table(results: dict) -> str:
    """Markdown: one row per length, one column per recipe, accuracy averaged over depths."""
    recipes = results["recipes"]
    lines = ["| length | " + " | ".join(recipes) + " |", "|---|" + "---:|" * len(recipes)]
    for length in results["settings"]["lengths"]:
        cells = []
        for recipe in recipes:
            values = [r["accuracy"] for r in _records(results, recipe) if r["length"] == length]
            cells.append(f"{sum(values) / len(values):.2f}" if values else "–")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: dict) -> str:
    if results["task"] == "ppl":
        return format_table({r["recipe"]: r for r in results["records"]})
    return accuracy_table(results)


def plot(results: dict, out: Path) -> Path | None:
    """ppl.png (perplexity by bucket, a line per recipe) or <task>.png (a heatmap per recipe); None without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    recipes = [r for r in results["recipes"] if _records(results, r)]
    path = out / f"{results['task']}.png"
    if results["task"] == "ppl":
        fig, ax = plt.subplots(figsize=(7, 4))
        for recipe in recipes:
            buckets = _records(results, recipe)[0]["buckets"]
            ax.plot([b["end"] for b in buckets], [b["ppl"] for b in buckets], marker="o", label=recipe)
        ax.set(xlabel="position (bucket end, tokens)", ylabel="perplexity", yscale="log", title=results["model"])
        ax.legend()
    else:
        lengths, depths = results["settings"]["lengths"], results["settings"]["depths"]
        fig, axes = plt.subplots(1, len(recipes), figsize=(3 + 2.5 * len(recipes), 3.5), squeeze=False)
        for ax, recipe in zip(axes[0], recipes, strict=True):
            grid = [[float("nan")] * len(lengths) for _ in depths]
            for r in _records(results, recipe):
                grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [str(d) for d in depths])
            ax.set(xlabel="length (tokens)", ylabel="depth", title=recipe)
        fig.suptitle(f"{results['task']} accuracy, {results['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- run --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Check the arguments, measure the cells not yet in results.json, plot, print the table."""
    plan = make_plan(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    results = load_results(plan)
    done = {_key(r["recipe"], r["length"], r["depth"]) for r in results["records"]}
    todo = [cell for cell in plan.cells() if _key(*cell) not in done]
    logger.info("%s: %d cells, %d already done", plan.task, len(plan.cells()), len(plan.cells()) - len(todo))
    if todo:
        from ..api import patched

        model, tokenizer = load_model(args.model, device, dtype, args.gguf)
        text_ids = read_text_ids(tokenizer, plan)
        with tqdm(total=len(todo), desc=plan.task, unit="cell", disable=args.no_progress) as bar:
            for recipe in dict.fromkeys(cell[0] for cell in todo):
                cells = [cell for cell in todo if cell[0] == recipe]
                with patched(model, recipe) if recipe != VANILLA else contextlib.nullcontext():
                    for _, length, depth in cells:
                        bar.set_postfix_str(f"{recipe} {length} {depth if depth is not None else ''}".strip())
                        began = time.perf_counter()
                        record = evaluate_cell(plan, model, tokenizer, text_ids, length, depth, recipe)
                        seconds = round(time.perf_counter() - began, 3)
                        results["records"].append(
                            {"recipe": recipe, "length": length, "depth": depth, "seconds": seconds, **record}
                        )
                        save_results(results, plan.out)
                        bar.update()
    save_results(results, plan.out)
    figure = plot(results, plan.out)
    text = table(results)
    drawn = f"and {figure}" if figure else f"({MISSING})"
    print(f"\n{plan.task}, {plan.model}:\n{text}\n\nwrote {plan.out / RESULTS} {drawn}")
    return results


def run_cli(args: argparse.Namespace) -> int:
    return run_reporting_errors(run, args)


def main(argv: list[str] | None = None) -> int:
    # `python -m lcpatch.eval.run` is `lcpatch eval`: its usage says so.
    parser = argparse.ArgumentParser(
        prog="lcpatch eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
