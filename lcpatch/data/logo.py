"""LOGO preference rows (Tang et al., 2024, arXiv 2410.18533), written by the model itself.

    lcpatch data logo --model MODEL --data 'books/*.txt' --out logo.jsonl --examples 200

For every example, a window of `context_chunks` chunks of `chunk_size` tokens is cut from a document,
and then:

1. **question**: given (`questions=`, `--questions FILE`), or written by the model about one chunk
   drawn at random (`question_template`);
2. **importance**: every chunk of the window is scored against the question (`scorer`, by default
   `bm25_scores`: Okapi BM25 of the question's words in each chunk, the window's chunks as the corpus);
   the `keep_chunks` best are the important chunks;
3. **chosen**: the model's answer given only the important chunks;
4. **rejected** (M = `num_rejected`), cycling through `NEGATIVES`:
   - `wrong`: the answer given the least important chunks instead (hallucination);
   - `unfollow`: the answer to another instruction (`UNFOLLOW_INSTRUCTIONS`) about the important chunks
     (instruction unfollowing);
   - `partial`: the important chunks with the best one swapped for the least important (hallucination
     from partial evidence).

A row is {"key", "prompt" (the question), "context" (the whole window: the real context LOGO trains on),
"chosen", "rejected" (M answers), "important" (chunk indices), "negatives" (their kinds)}. Generation is
batched and resumable (`lcpatch.data.batched_generation`): with `work=`, a rerun skips what is already written.
`encode_prompt` is the prompt format both the builder and `lcpatch.training.logo` read rows with.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LcpatchError, RecipeError
from .batched_generation import JsonlShards, generate_batched
from .documents import load_texts
from .tokens import encode

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "{context}\n\nAnswer the question using the text above.\nQuestion: {question}"
QUESTION_TEMPLATE = "{chunk}\n\nWrite one question that the text above answers. Reply with the question only."
UNFOLLOW_INSTRUCTIONS = ("Summarize the text above in one sentence.", "Continue the text above.")
NEGATIVES = ("wrong", "unfollow", "partial")
_CONTEXT_MARK = "<<lcpatch-context>>"


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as three token runs: head (BOS, chat header), the context, tail (question, answer header)."""

    head: list[int]
    context: list[int]
    tail: list[int]

    @property
    def ids(self) -> list[int]:
        return self.head + self.context + self.tail


def _user_turn(tokenizer, text: str) -> str:
    """One user turn in the tokenizer's chat template (when it has one), ready for the answer."""
    if not tokenizer.chat_template:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(tokenizer, context: str, question: str) -> PromptTokens:
    """PROMPT_TEMPLATE as a user turn, tokenised around the context."""
    text = _user_turn(tokenizer, PROMPT_TEMPLATE.format(context=_CONTEXT_MARK, question=question))
    head, tail = text.split(_CONTEXT_MARK)
    return PromptTokens(encode(tokenizer, head, lead=True), encode(tokenizer, context), encode(tokenizer, tail))


def split_chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    """`ids` cut into runs of `size` tokens (the last one shorter)."""
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25_scores(chunks: Sequence[str], question: str, k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 of the question's distinct words in each chunk, the chunks being the corpus (idf).

    Cheap and model-free: a chunk that repeats the question's rarer words scores high.
    """
    docs = [Counter(_words(chunk)) for chunk in chunks]
    lengths = [sum(doc.values()) for doc in docs]
    average = sum(lengths) / len(docs) or 1.0
    scores = [0.0] * len(docs)
    for term in set(_words(question)):
        holding = sum(term in doc for doc in docs)
        idf = math.log(1 + (len(docs) - holding + 0.5) / (holding + 0.5))
        for i, doc in enumerate(docs):
            tf = doc[term]
            scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[i] / average))
    return scores


def _windows(tokenizer, texts: Sequence[str], window: int, limit: int) -> list[list[int]]:
    """Up to `limit` windows of `window` tokens, taken in turn from each document (so every book contributes)."""
    per_document = [split_chunks(ids, window) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    per_document = [[w for w in windows if len(w) == window] for windows in per_document]
    out = []
    for depth in range(max((len(w) for w in per_document), default=0)):
        out += [windows[depth] for windows in per_document if depth < len(windows)]
    if not out:
        raise RecipeError(f"no document holds {window} tokens (context_chunks x chunk_size); give longer texts.")
    if len(out) < limit:
        logger.warning("LOGO: the documents hold %d windows of %d tokens; %d examples asked", len(out), window, limit)
    return out[:limit]


def _negative_chunks(kind: str, order: list[int], keep: int) -> list[int]:
    """Chunk indices a negative of `kind` is answered from; `order` ranks chunks from most to least important."""
    if kind == "wrong":
        return sorted(order[-keep:])
    if kind == "partial":
        return sorted([*order[1:keep], order[-1]])
    return sorted(order[:keep])  # unfollow: the right chunks, another instruction


def build_logo_rows(
    model,
    tokenizer,
    texts: Sequence[str],
    num_examples: int,
    *,
    chunk_size: int = 512,
    context_chunks: int = 8,
    keep_chunks: int = 2,
    num_rejected: int = 2,
    questions: Sequence[str] | None = None,
    question_template: str = QUESTION_TEMPLATE,
    scorer: Callable[[Sequence[str], str], list[float]] = bm25_scores,
    answer_tokens: int = 128,
    question_tokens: int = 48,
    batch_size: int = 8,
    seed: int = 0,
    work: str | Path | None = None,
) -> list[dict]:
    """LOGO rows from `texts` (see the module docstring), generated greedily by `model` as it is."""
    if not 1 <= keep_chunks < context_chunks:
        raise RecipeError(f"keep_chunks must be in [1, context_chunks = {context_chunks}); got {keep_chunks}.")
    if num_rejected < 1:
        raise RecipeError(f"num_rejected must be an integer >= 1; got {num_rejected}.")
    windows = _windows(tokenizer, texts, chunk_size * context_chunks, num_examples)
    chunks = [[tokenizer.decode(c) for c in split_chunks(w, chunk_size)] for w in windows]
    keys = [f"example{i}" for i in range(len(windows))]

    def shards(stage: str) -> JsonlShards | None:
        return JsonlShards(Path(work) / stage) if work is not None else None

    def generate(stage: str, prompts: list[list[int]], stage_keys: list[str], tokens: int) -> list[str]:
        return generate_batched(
            model, tokenizer, prompts, tokens, batch_size, keys=stage_keys, shards=shards(stage), desc=f"logo {stage}"
        )

    if questions is None:
        rng = random.Random(seed)
        sources = [window[rng.randrange(context_chunks)] for window in chunks]
        prompts = [
            encode(tokenizer, _user_turn(tokenizer, question_template.format(chunk=source)), lead=True)
            for source in sources
        ]
        questions = generate("questions", prompts, keys, question_tokens)
    elif len(questions) < len(windows):
        raise RecipeError(f"{len(questions)} questions given for {len(windows)} examples; give one per example.")
    questions = [q.strip().splitlines()[0] if q.strip() else "What is the text about?" for q in questions]

    orders = []
    for window, question in zip(chunks, questions, strict=False):
        scores = scorer(window, question)
        orders.append(sorted(range(len(window)), key=lambda i, scores=scores: -scores[i]))
    kinds = [NEGATIVES[j % len(NEGATIVES)] for j in range(num_rejected)]
    prompts, answer_keys = [], []
    for key, window, question, order in zip(keys, chunks, questions, orders, strict=False):
        jobs = [("chosen", sorted(order[:keep_chunks]), question)]
        for j, kind in enumerate(kinds):
            instruction = (
                UNFOLLOW_INSTRUCTIONS[j // len(NEGATIVES) % len(UNFOLLOW_INSTRUCTIONS)]
                if kind == "unfollow"
                else question
            )
            jobs.append((f"rejected{j}", _negative_chunks(kind, order, keep_chunks), instruction))
        for name, picked, instruction in jobs:
            prompts.append(encode_prompt(tokenizer, "\n".join(window[i] for i in picked), instruction).ids)
            answer_keys.append(f"{key}-{name}")
    answers = dict(zip(answer_keys, generate("answers", prompts, answer_keys, answer_tokens), strict=True))

    rows = []
    for key, window, question, order in zip(keys, windows, questions, orders, strict=False):
        rejected = [answers[f"{key}-rejected{j}"] for j in range(num_rejected)]
        rows.append(
            {
                "key": key,
                "prompt": question,
                "context": tokenizer.decode(window),
                "chosen": answers[f"{key}-chosen"],
                "rejected": rejected,
                "important": sorted(order[:keep_chunks]),
                "negatives": kinds,
            }
        )
    same = sum(row["chosen"] in row["rejected"] for row in rows)
    logger.info("LOGO: %d rows (%d with a rejected answer equal to the chosen one)", len(rows), same)
    return rows


def write_rows(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_rows(data: Sequence[str]) -> list[dict]:
    """The rows of JSONL files, folders of .jsonl files or globs (`training.data` of a logo recipe)."""
    if not data:
        raise RecipeError("training.data is empty; give the JSONL file(s) written by `lcpatch data logo`.")
    rows = []
    for entry in data:
        path = Path(entry).expanduser()
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [Path(p) for p in sorted(glob.glob(str(path)))]
        if not files:
            raise RecipeError(f"training.data entry {entry!r} matches no .jsonl file; run `lcpatch data logo` first.")
        for file in files:
            rows += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local model folder or Hub id: it writes questions and answers")
    parser.add_argument(
        "--data", nargs="+", required=True, help="text files, folders of .txt, globs or a datasets name"
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file written")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--context-chunks", type=int, default=8, help="chunks per example's context window")
    parser.add_argument("--keep-chunks", type=int, default=2, help="important chunks the chosen answer reads")
    parser.add_argument("--num-rejected", type=int, default=2)
    parser.add_argument(
        "--questions", type=Path, help="a text file, one question per line (default: the model writes them)"
    )
    parser.add_argument("--question-template", default=QUESTION_TEMPLATE, help="with a {chunk} field")
    parser.add_argument("--answer-tokens", type=int, default=128)
    parser.add_argument("--question-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="resumable generation shards (default: OUT's name + '-work')")


def run_cli(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "{chunk}" not in args.question_template:
        raise LcpatchError(f"--question-template needs a {{chunk}} field; got {args.question_template!r}.")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    questions = args.questions.read_text(encoding="utf-8").splitlines() if args.questions else None
    rows = build_logo_rows(
        model,
        tokenizer,
        load_texts(tuple(args.data)),
        args.examples,
        chunk_size=args.chunk_size,
        context_chunks=args.context_chunks,
        keep_chunks=args.keep_chunks,
        num_rejected=args.num_rejected,
        questions=questions,
        question_template=args.question_template,
        answer_tokens=args.answer_tokens,
        question_tokens=args.question_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        work=args.work or args.out.with_name(args.out.stem + "-work"),
    )
    logger.info("wrote %s", write_rows(rows, args.out))
    return 0
