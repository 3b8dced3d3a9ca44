"""A tiny model that retrieves a passkey inside its training length, to test InfLLM's retrieval far past it on CPU.

SmolLM2-135M cannot retrieve a passkey even in-length, and fine-tuning it (benchmarks/infllm-passkey) needs
a GPU. This asks the same question at toy scale: a small Llama with a word-level vocabulary of the passkey
prompts (lcpatch.eval.passkey) is trained from scratch on prompts of up to T tokens, then its accuracy is
measured at 1x..8x T for vanilla, lm-infinite and infllm (the recipes' `auto` values, resolved from T).
Byte-level models were tried first and stayed at chance on the key after 1,000 steps: in bytes the
needle's "key is" and the filler's "sky is" differ only two bytes before " is".

    python benchmarks/passkey-tiny/run.py --out runs/tiny-passkey                 # ~13 minutes on one CPU core
    python benchmarks/passkey-tiny/run.py --out runs/tiny-passkey --variants --eval-lengths 256,1024

Writes the model (config, weights, tokenizer), results.json (accuracy per method, length and depth; the
final loss on the answers; versions) and results.md into --out; --variants writes variants.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lcpatch
from lcpatch.cli.common import environment
from lcpatch.eval.passkey import (
    ANSWER_PREFIX,
    FILLER,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    passkey_accuracy,
    training_example,
)

METHODS = {"vanilla": None, "lm-infinite": "lm-infinite", "infllm": "infllm"}
# --variants: which part of InfLLM fails on this model (selection, representatives, init tokens, window).
VARIANTS = {
    "infllm, topk covering every block": {"method": "infllm", "topk": 1000, "max_cached_blocks": 1000},
    "infllm, exc_block_size 1": {"method": "infllm", "exc_block_size": 1},
    "infllm, block_size 16, topk 4": {"method": "infllm", "block_size": 16, "topk": 4},
    "infllm, repr_topk 1": {"method": "infllm", "repr_topk": 1},
    "infllm, n_init 16": {"method": "infllm", "n_init": 16},
    "lm-infinite, window 128": {"method": "lm-infinite", "window": 128},
}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
EOS, UNK = "<eos>", "<unk>"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words, punctuation and single digits of the passkey prompts; decoding joins tokens with spaces."""
    text = INSTRUCTION + FILLER + NEEDLE + QUESTION + ANSWER_PREFIX
    words = sorted(set(re.findall(r"[A-Za-z]+|[^\sA-Za-z0-9{}]", text)) | set("0123456789"))
    vocab = {token: index for index, token in enumerate([EOS, UNK, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, unk_token=UNK, pad_token=EOS)


def new_model(vocab_size: int, length: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=length,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def repeated_random_tokens(vocab_size: int, length: int, rng: random.Random) -> list[int]:
    """Random tokens, then the same again: every token of the second half can be copied from the first.

    The passkey prompts alone carry a few copyable tokens each, and models trained on them stayed at chance
    on the key for 3,000 steps. Copying grows induction heads, and drawing from a few tokens only makes one
    token of context ambiguous, as "is" is in the prompts: the copy must match several tokens back."""
    alphabet = rng.sample(range(1, vocab_size), rng.randint(3, vocab_size - 1))
    half = [rng.choice(alphabet) for _ in range(length // 2)]
    return (half * 2 + half[:1])[:length]


def train(model, tokenizer, args) -> list[float]:
    """AdamW on batches of one random length each (T/4..T), loss on every token: half passkey prompts with
    their answers, half repeated random tokens. The loss printed is the one on the passkey answers only (the
    key and eos): chance is about 1.9 nats per token."""
    rng = random.Random(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    model.train()
    losses = []
    for step in range(args.steps):
        length = rng.randint(args.length // 4, args.length - 7)  # room for the answer: the key and eos
        examples = [training_example(tokenizer, length, rng) for _ in range(args.batch_size // 2)]
        ids, answer = (torch.tensor(column) for column in zip(*examples, strict=True))
        copies = [repeated_random_tokens(len(tokenizer), ids.shape[1], rng) for _ in range(args.batch_size // 2)]
        batch = torch.cat([ids, torch.tensor(copies)])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        with torch.no_grad():
            logits = out.logits[: len(answer), :-1]
            losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), answer[:, 1:]).item())
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss on the answer {sum(losses[-100:]) / len(losses[-100:]):.3f}", flush=True)
    return losses


def evaluate(folder: Path, tokenizer, recipes: dict, args) -> dict:
    """{name: {length: {depth: accuracy}}}, each recipe (None: vanilla) on a freshly loaded copy of the model."""
    results = {}
    for method, recipe in recipes.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        if recipe is not None:
            lcpatch.apply(model, {"attention": recipe} if isinstance(recipe, dict) else recipe)
        scored = passkey_accuracy(
            model, tokenizer, args.eval_lengths, list(DEPTHS), args.samples, seed=args.seed + 1, progress=False
        )
        results[method] = {str(n): {str(d): a for d, a in row.items()} for n, row in scored["accuracy"].items()}
        print(method, {n: round(sum(row.values()) / len(row), 2) for n, row in results[method].items()}, flush=True)
    return results


def table(results: dict, lengths: list[int]) -> str:
    rows = ["| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for method, by_length in results.items():
        means = (sum(by_length[str(n)].values()) / len(by_length[str(n)]) for n in lengths)
        rows.append(f"| {method} | " + " | ".join(f"{100 * m:.0f}%" for m in means) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/tiny-passkey"))
    parser.add_argument("--length", type=int, default=256, help="longest training prompt: the training length T")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024, 2048])
    parser.add_argument("--samples", type=int, default=4, help="prompts per (length, depth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true", help="score the model already in --out")
    parser.add_argument("--variants", action="store_true", help="score the InfLLM variants instead (variants.json)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    losses, seconds = None, None
    if args.eval_only:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.out)
    else:
        tokenizer = word_tokenizer()
        model = new_model(len(tokenizer), args.length, args.seed)
        start = time.perf_counter()
        losses = train(model, tokenizer, args)
        seconds = round(time.perf_counter() - start)
        model.eval().save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
    if args.variants:
        variants = evaluate(args.out, tokenizer, VARIANTS, args)
        (args.out / "variants.json").write_text(json.dumps(variants, indent=2))
        print(table(variants, args.eval_lengths))
        return
    results = evaluate(args.out, tokenizer, METHODS, args)
    summary = table(results, args.eval_lengths)
    meta = {
        "training_length": args.length,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "samples_per_cell": args.samples,
        "depths": DEPTHS,
        "train_seconds": seconds,
        "final_answer_loss": None if losses is None else sum(losses[-100:]) / len(losses[-100:]),
        **environment("cpu"),
    }
    (args.out / "results.json").write_text(json.dumps({"accuracy": results, "run": meta}, indent=2))
    (args.out / "results.md").write_text(summary + "\n")
    print(summary, meta, sep="\n")


if __name__ == "__main__":
    main()
