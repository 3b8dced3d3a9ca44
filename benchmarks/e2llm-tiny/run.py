"""E2-LLM on a tiny byte-level Llama, on CPU: does one short-sequence fine-tune read 8x longer texts?

A ~0.8M-parameter Llama (bytes as tokens) is trained from scratch at L = 256 on Project Gutenberg
books, one book held out. It is then continued three ways for the same number of steps:
plain, linear position interpolation at g = 8 (PI), and E2-LLM with g_max = 8 (with --g-weights, a fourth:
E2-LLM drawing g with those relative weights). Perplexity on the
held-out book is measured in windows of 256, 512, 1024 and 2048 bytes, each model with its own
positions: plain g = 1, PI g = 8, E2-LLM g = ceil(n / 256) (its recipe's `factor: auto`). All
training goes through `lcpatch.training.runner.run`, all loading through `lcpatch.from_pretrained`.

    python benchmarks/e2llm-tiny/run.py --data ../shared/data/gutenberg --out results/e2llm-tiny \
        [--fixture tests/fixtures/tiny-e2llm] [--eval-only]

Writes results.json, results.md (whole windows; bytes past position 256 only) and perplexity.png in
--out; with --fixture, copies the E2-LLM model there (config, weights, tokenizer, recipe, 8 KB of the
held-out book) for fast CPU quality tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

import lcpatch
from lcpatch.cli.common import MISSING, environment, parse_numbers, pyplot
from lcpatch.errors import LcpatchError
from lcpatch.rope import E2LLM, Linear, NoScaling
from lcpatch.training import CausalLMTraining, E2LLMTraining
from lcpatch.training.config import check_g_weights
from lcpatch.training.runner import run

L = 256
LENGTHS = (256, 512, 1024, 2048)
EOS = "<|endoftext|>"
FIXTURE_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id = byte value (0-255), plus EOS = 256: no vocabulary to learn, nothing to download."""
    to_char = bytes_to_unicode()
    vocab = {to_char[b]: b for b in range(256)} | {EOS: 256}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def initial_model(folder: Path, seed: int) -> Path:
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=L,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=256,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


FOLDERS = {"base (before continuation)": "base", "plain": "plain", "PI g=8": "pi", "E2-LLM g_max=8": "e2-llm"}


def weighted_name(weights: tuple[float, ...]) -> str:
    return "E2-LLM g_max=8, g_weights " + ",".join(f"{w:g}" for w in weights)


def folders(args) -> dict[str, str]:
    """Each model's folder under --out (the weighted E2-LLM only with --g-weights)."""
    return FOLDERS | ({weighted_name(args.g_weights): "e2-llm-weighted"} if args.g_weights else {})


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, length: int, rows_per_batch: int = 8) -> tuple[float, float | None]:
    """exp(mean NLL) over consecutive windows of `length` tokens, each read from its own start: over all
    predicted tokens, and over those at positions >= L only (None when length <= L)."""
    windows = ids[: ids.numel() // length * length].view(-1, length)
    nll = []
    for start in range(0, windows.shape[0], rows_per_batch):
        batch = windows[start : start + rows_per_batch]
        logits = model(batch).logits[:, :-1].float()
        nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none"))
    nll = torch.cat(nll)  # (windows, length - 1): column j is the token at position j + 1
    beyond = math.exp(float(nll[:, L - 1 :].mean())) if length > L else None
    return math.exp(float(nll.mean())), beyond


def train_all(args, train_files: list[str]) -> None:
    """A shared plain pretraining at L, then the three continuations, each for --steps steps."""
    common = dict(
        data=tuple(train_files),
        sequence_length=L,
        lora=None,
        batch_size=args.batch_size,
        logging_steps=20,
        seed=args.seed,
        dtype="float32",
    )
    init = initial_model(args.out / "init", args.seed)
    base = run(
        lcpatch.Recipe(
            name="tiny-base",
            training=CausalLMTraining(
                model=str(init),
                output_dir=str(args.out / FOLDERS["base (before continuation)"]),
                max_steps=args.base_steps,
                learning_rate=2.0e-3,
                warmup_steps=20,
                **common,
            ),
        )
    )
    ways = {
        "plain": (NoScaling(), CausalLMTraining),
        "PI g=8": (Linear(factor=8), CausalLMTraining),
        "E2-LLM g_max=8": (E2LLM(), lambda **kw: E2LLMTraining(g_max=8, **kw)),
    }
    if args.g_weights:
        ways[weighted_name(args.g_weights)] = (
            E2LLM(),
            lambda **kw: E2LLMTraining(g_max=8, g_weights=args.g_weights, **kw),
        )
    for name, (rope, training) in ways.items():
        run(
            lcpatch.Recipe(
                name=name,
                rope=rope,
                training=training(
                    model=str(base),
                    output_dir=str(args.out / folders(args)[name]),
                    max_steps=args.steps,
                    learning_rate=1.0e-3,
                    warmup_steps=10,
                    **common,
                ),
            )
        )


def table(results: dict, key: str) -> str:
    lengths = [n for n in LENGTHS if next(iter(results.values()))[key][str(n)] is not None]
    header = "| model (trained at 256) | " + " | ".join(str(n) for n in lengths) + " |"
    lines = [header, "|---" * (len(lengths) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[key][str(n)]:.2f}" for n in lengths) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        print(MISSING)
        return

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in results.items():
        ax.plot(LENGTHS, [row["window"][str(n)] for n in LENGTHS], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
    ax.set_xlabel("evaluation window (bytes); trained at 256")
    ax.set_ylabel("held-out perplexity (per byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of .txt books (../shared/data/gutenberg)")
    parser.add_argument("--heldout", default="melville-moby_dick.txt", help="the book kept out of training")
    parser.add_argument("--out", type=Path, default=Path("results/e2llm-tiny"))
    parser.add_argument("--base-steps", type=int, default=200, help="plain pretraining steps, shared by all three")
    parser.add_argument("--steps", type=int, default=80, help="continuation steps of each of the three ways")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-bytes", type=int, default=65536, help="held-out bytes scored at each length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--g-weights",
        help="also continue E2-LLM drawing g = 1..8 with these relative weights, e.g. 8,1,1,1,1,1,1,1",
    )
    parser.add_argument("--eval-only", action="store_true", help="score the models already trained in --out")
    parser.add_argument("--fixture", type=Path, help="copy the E2-LLM model here (e.g. tests/fixtures/tiny-e2llm)")
    args = parser.parse_args()
    try:
        args.g_weights = parse_numbers("--g-weights", args.g_weights) if args.g_weights is not None else ()
        check_g_weights(args.g_weights, 8)  # before the base training, not after it
    except LcpatchError as error:
        parser.error(str(error))

    books = sorted(args.data.glob("*.txt"))
    heldout = args.data / args.heldout
    if heldout not in books:
        parser.error(f"--heldout {args.heldout} is not a .txt file in {args.data}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.eval_only:
        train_all(args, [str(p) for p in books if p != heldout])
    trained = {name: args.out / sub for name, sub in folders(args).items()}
    train_seconds = sum(
        json.loads((folder / "trainer_state.json").read_text())["log_history"][-1]["train_runtime"]
        for folder in trained.values()
    )

    ids = torch.tensor(list(heldout.read_bytes()[: args.eval_bytes]))
    results = {}
    for name, folder in trained.items():
        model = lcpatch.from_pretrained(folder).eval()
        scores = {n: perplexity(model, ids, n) for n in LENGTHS}
        results[name] = {part: {str(n): scores[n][i] for n in LENGTHS} for i, part in enumerate(("window", "beyond"))}
        print(name, results[name], flush=True)

    e2, plain, pi = (results[name]["window"] for name in ("E2-LLM g_max=8", "plain", "PI g=8"))
    goal = {
        "e2llm_2048_within_15pct_of_256": e2["2048"] <= 1.15 * e2["256"],
        "e2llm_beats_both_baselines_beyond_256": all(e2[str(n)] < min(plain[str(n)], pi[str(n)]) for n in LENGTHS[1:]),
    }
    meta = {
        **environment(model.device),
        "heldout": args.heldout,
        "eval_bytes": args.eval_bytes,
        "base_steps": args.base_steps,
        "steps": args.steps,
        "g_weights": args.g_weights,
        "batch_size": args.batch_size,
        "sequence_length": L,
        "train_runtime_seconds": round(train_seconds),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    tables = (
        "Perplexity per byte over whole windows of n bytes:\n\n"
        + table(results, "window")
        + "\n\nOnly the bytes at positions 256..n-1 of each window (past the training length):\n\n"
        + table(results, "beyond")
    )
    (args.out / "results.json").write_text(json.dumps({"perplexity": results, "goal": goal, "run": meta}, indent=2))
    (args.out / "results.md").write_text(tables + "\n")
    plot(results, args.out / "perplexity.png")
    print(tables, goal, meta, sep="\n")

    if args.fixture:
        args.fixture.mkdir(parents=True, exist_ok=True)
        source = trained["E2-LLM g_max=8"]
        for name in FIXTURE_FILES:
            shutil.copy(source / name, args.fixture / name)
        recipe = lcpatch.load_recipe(source)
        # The training paths are this machine's: the fixture keeps what apply needs.
        (args.fixture / "lcpatch_recipe.yaml").write_text(dataclasses.replace(recipe, training=None).to_yaml())
        # Tests must not depend on ../shared: they score the start of the held-out text kept here.
        (args.fixture / "heldout.txt").write_bytes(heldout.read_bytes()[:8192])


if __name__ == "__main__":
    main()
