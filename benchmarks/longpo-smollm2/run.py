"""LongPO on SmolLM2-135M-Instruct (trained at 8k): pairs built by the model from 16k-token contexts of the
Gutenberg books, a LoRA trained on them with `lcpatch.training.runner.run`, and, before / after, on held-out material:

- preference accuracy: held-out pairs (Moby Dick) where the policy's short-to-long reward prefers the
  short-context answer, log π(y | long) - log π_ref(y | short) (the reference: the starting model);
- perplexity by position to --eval-length tokens of Moby Dick (vanilla, the starting model under the
  recipe, the LongPO LoRA under the recipe);
- answer agreement: unigram F1 between the model's answer given the whole 16k context and its own
  short-context answer (the chosen one), on the held-out questions; "before" is the pairs' rejected answer.

Everything runs under the built-in `longpo` recipe (dense attention, YaRN x4): the rejected answers, the
training and the "after" model, with two changes from the recipe's (the paper's) loss weights: beta = 0.1 and
dpo_weight (lambda) = 1 (--beta, --dpo-weight). At the paper's 0.01 and 0.01 the DPO term's gradient is about 1/400
of the NLL term's (lambda * beta * sigma / 2 per answer token against 1 / |answer|), so only the NLL on the chosen
answers trains and the held-out preference accuracy stays where it starts (0.000 on the H200, 2026-12-03: a
policy equal to the reference prefers its own long-context answers).

On the GPU machine (the README's LongPO section has the device commands):
    python3 benchmarks/longpo-smollm2/run.py --gguf /tmp/lcm/model.gguf --data /tmp/gutenberg --out $OUT/longpo \\
        --work /tmp/work
CPU smoke run of the whole pipeline (a tiny random Llama with SmolLM2's tokenizer, small sizes):
    python benchmarks/longpo-smollm2/run.py --tiny --model ~/.cache/lcpatch/smollm2-135m-instruct \\
        --data ../shared/data/gutenberg --out /tmp/longpo-tiny
Writes results.json and results.md to --out; the pairs, shards and adapter go to --work.

Time with the defaults (24 contexts: ~92 pairs; three epochs: 70 steps), measured on an H100 (2026-12-07,
results-h100-2026-12-07-epochs3/): 424 s alone with the pairs read back (training 362 s), 921 s shared with five
other runs (pairs 160 s, training 659 s); building the pairs takes about 150 s. The defaults are the run that kept
short-context perplexity (0.983x the start) with the most held-out preference accuracy at that rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path

import peft
import torch
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lcpatch
from lcpatch.cli.common import environment
from lcpatch.data import generate_batched
from lcpatch.data.longpo import PairOptions, build_pairs, prompt_ids
from lcpatch.eval.perplexity import perplexity_by_position, perplexity_up_to
from lcpatch.training.longpo import LongPOTrainer
from lcpatch.training.runner import run

# GPU sizes and the tiny CPU smoke sizes.
SIZES = {
    "gpu": dict(
        chunk_length=1024, long_length=16384, train_contexts=24, heldout_contexts=8, eval_length=32768, bucket=4096
    ),
    "tiny": dict(chunk_length=64, long_length=1024, train_contexts=6, heldout_contexts=2, eval_length=2048, bucket=512),
}


SHORT = 8192  # the model's training length: the goal keeps perplexity up to it within 5% of the start


def model_folder(args) -> Path:
    """The model the run starts from: a converted SmolLM2 folder, or (--tiny) a random 2-layer Llama with its
    tokenizer."""
    if args.gguf:
        from lcpatch.demo import smollm2

        smollm2.load_smollm2(cache_dir=args.work / "cache", gguf_path=args.gguf)
        folder = args.work / "cache" / smollm2.CACHE_NAME
    else:
        folder = args.model
    if not args.tiny:
        return folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    tiny = args.work / "tiny-model"
    LlamaForCausalLM(config).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    return tiny


def load(folder: Path, dtype, device):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def agreement(answer: str, reference: str) -> float:
    """Unigram F1 of two answers (lower-cased words): 1 when they say the same words."""
    a, b = Counter(answer.lower().split()), Counter(reference.lower().split())
    common = sum((a & b).values())
    return 0.0 if common == 0 else 2 * common / (sum(a.values()) + sum(b.values()))


def text_of(value) -> str:
    return value[-1]["content"] if isinstance(value, list) else value.strip()


def preference_accuracy(model, tokenizer, pairs, recipe, work: Path) -> tuple[float, object]:
    """Held-out reward accuracy through LongPOTrainer.evaluate; the pairs come back with the reference
    log-probs (computed here by `model` on the short prompts when they lack them) for the next call."""
    training = recipe.training
    args = trl.DPOConfig(
        output_dir=str(work / "eval"),
        per_device_eval_batch_size=1,
        beta=training.beta,
        loss_type=["sft", "sigmoid"],
        loss_weights=[1.0, training.dpo_weight],
        max_length=None,  # TRL's default (1024) would drop every long prompt
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=1,
        report_to="none",
        bf16=model.dtype == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = LongPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    metrics = trainer.evaluate(trainer.train_dataset)
    return metrics["eval_rewards/accuracies"], trainer.train_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct GGUF file (converted once into --work/cache)")
    source.add_argument("--model", type=Path, help="a transformers model folder (SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random Llama, small sizes")
    parser.add_argument("--data", type=Path, required=True, help="folder of .txt books (Project Gutenberg)")
    parser.add_argument("--heldout", default="melville-moby_dick.txt", help="book kept out of training and scored")
    parser.add_argument("--out", type=Path, required=True, help="results.json and results.md")
    parser.add_argument("--work", type=Path, help="pairs, shards, adapter (default: --out/work)")
    parser.add_argument("--train-contexts", type=int, help="16k-token contexts drawn for training pairs (default 24)")
    parser.add_argument("--heldout-contexts", type=int, help="contexts of the held-out book (default 8)")
    parser.add_argument("--chunks-per-context", type=int, default=4)
    parser.add_argument("--instruction-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--generation-batch", type=int, default=16)
    parser.add_argument("--gradient-accumulation", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the training pairs")
    parser.add_argument("--learning-rate", type=float, default=2.0e-4)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (the recipe's, the paper's: 0.01)")
    parser.add_argument("--dpo-weight", type=float, default=1.0, help="lambda on the DPO term (the paper's: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = SIZES["tiny" if args.tiny else "gpu"]
    sizes.update({k: getattr(args, k) for k in ("train_contexts", "heldout_contexts") if getattr(args, k)})
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out / "work"
    args.work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    dtype, device = (torch.bfloat16, "cuda") if cuda else (torch.float32, "cpu")
    started = time.time()

    base = model_folder(args)
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    recipe = lcpatch.load_recipe("longpo")
    recipe = dataclasses.replace(
        recipe, training=dataclasses.replace(recipe.training, beta=args.beta, dpo_weight=args.dpo_weight)
    )
    books = sorted(args.data.glob("*.txt"))
    heldout = args.data / args.heldout
    if heldout not in books:
        parser.error(f"--heldout {args.heldout} is not a .txt file in {args.data}")
    texts = {p: p.read_text(encoding="utf-8", errors="replace") for p in books}

    # 1. pairs, written by the starting model (rejected: under the recipe)
    model = load(base, dtype, device)
    options = PairOptions(
        chunk_length=sizes["chunk_length"],
        long_length=sizes["long_length"],
        chunks_per_document=args.chunks_per_context,
        instruction_tokens=args.instruction_tokens,
        answer_tokens=args.answer_tokens,
        batch_size=args.generation_batch,
        seed=args.seed,
    )
    clock = time.time()
    train_texts = [t for p, t in texts.items() if p != heldout]
    train_options = dataclasses.replace(options, max_documents=sizes["train_contexts"])
    train_pairs = build_pairs(model, tokenizer, train_texts, recipe, train_options, args.work / "shards-train")
    heldout_options = dataclasses.replace(options, max_documents=sizes["heldout_contexts"], seed=args.seed + 1)
    heldout_pairs = build_pairs(
        model, tokenizer, [texts[heldout]], recipe, heldout_options, args.work / "shards-heldout"
    )
    pairs_seconds = time.time() - clock
    train_pairs.save_to_disk(str(args.work / "pairs-train"))
    print(f"pairs: {len(train_pairs)} train, {len(heldout_pairs)} held out, {pairs_seconds:.0f} s", flush=True)

    # 2. before: preference accuracy (reference log-probs kept for "after"), perplexity by position
    eval_ids = tokenizer(texts[heldout], add_special_tokens=False, return_tensors="pt").input_ids[
        0, : sizes["eval_length"]
    ]
    perplexity = {"vanilla": perplexity_by_position(model, eval_ids, bucket=sizes["bucket"], desc="vanilla")}
    with lcpatch.patched(model, recipe):
        accuracy_before, heldout_scored = preference_accuracy(model, tokenizer, heldout_pairs, recipe, args.work)
        perplexity["start (recipe)"] = perplexity_by_position(model, eval_ids, bucket=sizes["bucket"], desc="start")
    del model

    # 3. LongPO LoRA through lcpatch.training.runner.run (what `lcpatch train longpo` runs)
    steps = math.ceil(args.epochs * len(train_pairs) / args.gradient_accumulation)
    training = dataclasses.replace(
        recipe.training,
        model=str(base),
        data=(str(args.work / "pairs-train"),),
        output_dir=str(args.work / "longpo-lora"),
        max_steps=steps,
        batch_size=1,
        gradient_accumulation_steps=args.gradient_accumulation,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 10),
        gradient_checkpointing=cuda,  # 2 x 16k-token rows per step: activations, not weights, fill the memory
        seed=args.seed,
    )
    clock = time.time()
    trained_folder = run(dataclasses.replace(recipe, training=training))
    train_seconds = time.time() - clock

    # 4. after: the LoRA (loaded onto its base, the recipe re-applied from its folder)
    trained = lcpatch.from_pretrained(trained_folder, dtype=dtype).to(device).eval()
    accuracy_after, _ = preference_accuracy(trained, tokenizer, heldout_scored, recipe, args.work)
    perplexity["LongPO LoRA (recipe)"] = perplexity_by_position(
        trained, eval_ids, bucket=sizes["bucket"], desc="LongPO"
    )
    chosen = [text_of(v) for v in heldout_pairs["chosen"]]
    long_prompts = [prompt_ids(tokenizer, p) for p in heldout_pairs["prompt_long"]]
    answers_after = generate_batched(
        trained, tokenizer, long_prompts, args.answer_tokens, args.generation_batch, desc="after"
    )
    agreement_before = [agreement(text_of(r), c) for r, c in zip(heldout_pairs["rejected"], chosen, strict=True)]
    agreement_after = [agreement(a, c) for a, c in zip(answers_after, chosen, strict=True)]

    mean = lambda values: sum(values) / max(1, len(values))  # noqa: E731
    summary = {
        "held-out preference accuracy": (accuracy_before, accuracy_after),
        "answer agreement with the short-context answer (F1)": (mean(agreement_before), mean(agreement_after)),
        "exact same answer": (
            mean([a == 1.0 for a in agreement_before]),
            mean([a == 1.0 for a in agreement_after]),
        ),
        f"perplexity, 0-{SHORT // 1024}k tokens": (
            perplexity_up_to(perplexity["start (recipe)"], SHORT),
            perplexity_up_to(perplexity["LongPO LoRA (recipe)"], SHORT),
        ),
        f"perplexity, 0-{SHORT // 1024}k tokens, against vanilla": (
            perplexity_up_to(perplexity["vanilla"], SHORT),
            perplexity_up_to(perplexity["LongPO LoRA (recipe)"], SHORT),
        ),
        f"perplexity, all {eval_ids.numel()} tokens": (
            perplexity["start (recipe)"]["overall"]["ppl"],
            perplexity["LongPO LoRA (recipe)"]["overall"]["ppl"],
        ),
    }
    short_before, short_after = summary[f"perplexity, 0-{SHORT // 1024}k tokens"]
    vanilla_short = summary[f"perplexity, 0-{SHORT // 1024}k tokens, against vanilla"][0]
    at_least = [
        ("held-out preference accuracy", accuracy_after, 0.6),
        ("answer agreement F1", summary["answer agreement with the short-context answer (F1)"][1], 0.6),
    ]
    at_most = [
        (f"0-{SHORT // 1024}k perplexity / the start's (recipe)", short_after / short_before, 1.05),
        (f"0-{SHORT // 1024}k perplexity / vanilla's", short_after / vanilla_short, 1.05),
    ]
    goals = [f"{n}: {v:.3f} (goal >= {g}): {'met' if v >= g else 'missed'}" for n, v, g in at_least]
    goals += [f"{n}: {v:.3f} (goal <= {g}): {'met' if v <= g else 'missed'}" for n, v, g in at_most]
    names = list(perplexity)
    lines = ["| measure (held out: Moby Dick) | before (start, recipe) | after (LongPO LoRA) |", "|---|---:|---:|"]
    lines += [f"| {name} | {before:.3f} | {after:.3f} |" for name, (before, after) in summary.items()]
    lines += ["", "| tokens | " + " | ".join(names) + " |", "|---" + "|---:" * len(names) + "|"]
    for i, bucket in enumerate(perplexity[names[0]]["buckets"]):
        cells = " | ".join(f"{perplexity[n]['buckets'][i]['ppl']:.2f}" for n in names)
        lines.append(f"| {bucket['start'] / 1024:g}k-{bucket['end'] / 1024:g}k | {cells} |")
    table = "\n".join(lines) + "\n\n" + "\n".join(f"- {goal}" for goal in goals)
    run_facts = {
        **environment(device),
        "trl": trl.__version__,
        "peft": peft.__version__,
        "dtype": str(dtype),
        "tiny": args.tiny,
        "recipe": recipe.to_dict(),
        "pair_options": dataclasses.asdict(options),
        "sizes": sizes,
        "pairs": {"train": len(train_pairs), "heldout": len(heldout_pairs)},
        "steps": steps,
        "gradient_accumulation": args.gradient_accumulation,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "dpo_weight": args.dpo_weight,
        "seconds": {
            "build_pairs": round(pairs_seconds),
            "train": round(train_seconds),
            "total": round(time.time() - started),
        },
    }
    results = {
        "summary": {k: {"before": b, "after": a} for k, (b, a) in summary.items()},
        "goals": goals,
        "perplexity": perplexity,
        "heldout_answers": [
            {"question": text_of(p).rsplit("\n", 1)[-1], "short": c, "long_before": text_of(r), "long_after": a}
            for p, c, r, a in zip(
                heldout_pairs["prompt_short"], chosen, heldout_pairs["rejected"], answers_after, strict=True
            )
        ],
        "run": run_facts,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    print(table, json.dumps(run_facts["seconds"]), sep="\n")


if __name__ == "__main__":
    main()
