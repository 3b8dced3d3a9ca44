"""LongPO's short-to-long preference pairs (Chen et al., 2025, arXiv 2502.13922), written by the model itself.

From long documents: cut `long_length`-token contexts; in each pick `chunks_per_document` short chunks
of `chunk_length` tokens (they fit the model's training length); the model writes an instruction about
each chunk (`instruction_template`); then it answers that instruction twice (`answer_template`):
- chosen: given only the short chunk, the model as it is (its short-context skill);
- rejected: given the whole long context, under a long-context recipe (`lm-infinite`, `infllm`, a rope
  scaling...), what the model does today at that length.

The pairs are a `datasets.Dataset` with `prompt_long`, `prompt_short`, `chosen`, `rejected` (TRL's
conversational format when the tokenizer has a chat template, plain text otherwise) plus `document` and
`chunk_start`. Every generation step is batched and writes JSON-lines shards under `work`, so a rerun
with the same options resumes.

    lcpatch data longpo --model DIR --data 'books/*.txt' --out pairs --long-length 16384 --recipe lm-infinite
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..fields import AUTO, check_int, check_str
from .batched_generation import JsonlShards, generate_batched
from .documents import load_texts

if TYPE_CHECKING:  # lcpatch.recipe loads transformers; `lcpatch data longpo --help` must not
    from ..recipe import RecipeLike

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_long", "prompt_short", "chosen", "rejected")
INSTRUCTION_TEMPLATE = (
    "Here is a passage from a book:\n\n{context}\n\n"
    "Write one question about this passage that can be answered from it. Reply with the question only."
)
ANSWER_TEMPLATE = "{context}\n\nAnswer this question about the text above.\nQuestion: {instruction}"


@dataclass(frozen=True)
class PairOptions:
    """How `build_pairs` cuts documents and asks the model; `auto` lengths come from its training length L."""

    chunk_length: int | str = AUTO  # short chunk, tokens; auto = L / 2 (room for the question and the answer)
    long_length: int | str = AUTO  # long context, tokens; auto = 4 L
    chunks_per_document: int = 4
    max_documents: int | None = None  # long contexts drawn at random from all; None: every one
    instruction_template: str = INSTRUCTION_TEMPLATE  # {context}: the chunk
    answer_template: str = ANSWER_TEMPLATE  # {context}: chunk or long context; {instruction}
    instruction_tokens: int = 48
    answer_tokens: int = 128
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        section = "longpo"
        check_int(section, "chunk_length", self.chunk_length, minimum=8, allow_auto=True)
        check_int(section, "long_length", self.long_length, minimum=16, allow_auto=True)
        for name in ("chunks_per_document", "instruction_tokens", "answer_tokens", "batch_size"):
            check_int(section, name, getattr(self, name), minimum=1)
        if self.max_documents is not None:
            check_int(section, "max_documents", self.max_documents, minimum=1)
        check_int(section, "seed", self.seed, minimum=0)
        for name, fields in (
            ("instruction_template", ("{context}",)),
            ("answer_template", ("{context}", "{instruction}")),
        ):
            template = getattr(self, name)
            check_str(section, name, template)
            missing = [f for f in fields if f not in template]
            if missing:
                raise RecipeError(f"longpo.{name} must contain {' and '.join(fields)}; {missing[0]} is missing.")

    def lengths(self, training_length: int) -> tuple[int, int]:
        """(chunk_length, long_length) with `auto` resolved; the chunk must be shorter than the long context."""
        chunk = training_length // 2 if self.chunk_length == AUTO else self.chunk_length
        long = 4 * training_length if self.long_length == AUTO else self.long_length
        if chunk >= long:
            raise RecipeError(
                f"longpo.chunk_length ({chunk}) must be shorter than longpo.long_length ({long}): the short chunk "
                "is cut from the long context."
            )
        return chunk, long


@dataclass(frozen=True)
class _Chunk:
    document: int
    start: int
    long_ids: list[int]
    chunk_ids: list[int]

    @property
    def key(self) -> str:
        return f"{self.document}:{self.start}"


def _chunks(token_ids: list[list[int]], chunk: int, long: int, options: PairOptions) -> list[_Chunk]:
    """`chunks_per_document` random chunks from each whole `long`-token context of the documents."""
    rng = random.Random(options.seed)
    contexts = [ids[start : start + long] for ids in token_ids for start in range(0, len(ids) - long + 1, long)]
    if not contexts:
        longest = max((len(ids) for ids in token_ids), default=0)
        raise RecipeError(
            f"no document holds longpo.long_length = {long} tokens (the longest has {longest}); "
            "lower --long-length or give longer documents."
        )
    if options.max_documents is not None and options.max_documents < len(contexts):  # a random few, in order
        contexts = [contexts[i] for i in sorted(rng.sample(range(len(contexts)), options.max_documents))]
    chunks = []
    for document, ids in enumerate(contexts):
        starts = sorted(rng.sample(range(long - chunk + 1), min(options.chunks_per_document, long - chunk + 1)))
        chunks += [_Chunk(document, start, ids, ids[start : start + chunk]) for start in starts]
    return chunks


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A stored prompt's token ids as TRL tokenises prompts: messages through the chat template with the
    generation prompt, plain text as it is."""
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(ids["input_ids"])
    return tokenizer(text=prompt)["input_ids"]


def _prompt(tokenizer, text: str) -> tuple[Any, list[int]]:
    """(the prompt as the dataset stores it: a user message when the tokenizer has a chat template, its token ids)."""
    prompt = [{"role": "user", "content": text}] if tokenizer.chat_template else text
    return prompt, prompt_ids(tokenizer, prompt)


def _completion(tokenizer, text: str) -> Any:
    """An answer as the dataset stores it; plain text gets a leading space, as TRL appends it to the prompt."""
    return [{"role": "assistant", "content": text}] if tokenizer.chat_template else " " + text


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def build_pairs(
    model,
    tokenizer,
    texts: list[str],
    long_recipe: RecipeLike = "lm-infinite",
    options: PairOptions | None = None,
    work: str | Path | None = None,
):
    """LongPO pairs (a `datasets.Dataset`) from `texts`, generated by `model` (unpatched; `long_recipe`
    is applied only while the rejected answers are written). `work`: shard folder for resuming."""
    from datasets import Dataset

    from ..api import patched
    from ..models.structure import training_length, unwrap

    options = options or PairOptions()
    chunk, long = options.lengths(training_length(unwrap(model).config))
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    chunks = _chunks(token_ids, chunk, long, options)
    logger.info("LongPO pairs: %d chunks of %d tokens from contexts of %d tokens", len(chunks), chunk, long)

    def shards(name: str) -> JsonlShards | None:
        return JsonlShards(Path(work) / name) if work is not None else None

    def generate(prompts: list[list[int]], keys: list[str], tokens: int, name: str) -> list[str]:
        return generate_batched(
            model, tokenizer, prompts, tokens, options.batch_size, keys=keys, shards=shards(name), desc=name
        )

    decode = tokenizer.decode
    asks = [_prompt(tokenizer, options.instruction_template.format(context=decode(c.chunk_ids)))[1] for c in chunks]
    instructions = [
        _first_line(t) for t in generate(asks, [c.key for c in chunks], options.instruction_tokens, "instructions")
    ]
    kept = [(c, i) for c, i in zip(chunks, instructions, strict=True) if i]
    short = [
        _prompt(tokenizer, options.answer_template.format(context=decode(c.chunk_ids), instruction=i)) for c, i in kept
    ]
    long_prompts = [
        _prompt(tokenizer, options.answer_template.format(context=decode(c.long_ids), instruction=i)) for c, i in kept
    ]
    keys = [c.key for c, _ in kept]
    chosen = generate([ids for _, ids in short], keys, options.answer_tokens, "chosen")
    with patched(model, long_recipe):
        rejected = generate([ids for _, ids in long_prompts], keys, options.answer_tokens, "rejected")

    rows = {name: [] for name in (*PAIR_COLUMNS, "document", "chunk_start")}
    for (c, _), (short_prompt, _), (long_prompt, _), good, bad in zip(
        kept, short, long_prompts, chosen, rejected, strict=True
    ):
        if not good or good == bad:  # no preference to learn
            continue
        for name, value in zip(
            rows,
            (long_prompt, short_prompt, _completion(tokenizer, good), _completion(tokenizer, bad), c.document, c.start),
            strict=True,
        ):
            rows[name].append(value)
    logger.info(
        "LongPO pairs: %d kept of %d chunks (%d without an instruction, %d with no preference)",
        len(rows["chosen"]),
        len(chunks),
        len(chunks) - len(kept),
        len(kept) - len(rows["chosen"]),
    )
    return Dataset.from_dict(rows)


def load_pairs(data: tuple[str, ...], dataset_config: str | None = None):
    """Pairs for training: folders written by `build_pairs(...).save_to_disk`, JSON-lines files, or a datasets name."""
    from datasets import concatenate_datasets, load_dataset, load_from_disk

    if not data:
        raise RecipeError("training.data is empty; give the pairs folder written by `lcpatch data longpo --out DIR`.")
    parts = []
    for entry in data:
        path = Path(entry).expanduser()
        if path.is_dir():
            parts.append(load_from_disk(str(path)))
        elif path.suffix in (".json", ".jsonl"):
            parts.append(load_dataset("json", data_files=str(path), split="train"))
        else:
            parts.append(load_dataset(entry, dataset_config, split="train"))
    pairs = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
    if missing:
        raise RecipeError(
            f"training.data {list(data)} lacks the LongPO column(s) {', '.join(missing)} (it has "
            f"{', '.join(pairs.column_names)}); build pairs with `lcpatch data longpo`."
        )
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a transformers model folder or Hub id (loaded as is)")
    parser.add_argument(
        "--data", nargs="+", required=True, help="text files, folders of .txt, globs or a datasets name"
    )
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--out", required=True, help="folder for the pairs (datasets save_to_disk)")
    parser.add_argument("--work", help="folder of the resumable generation shards (default: OUT.work)")
    parser.add_argument("--recipe", default="lm-infinite", help="long-context recipe for the rejected answers")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    for name, value in PairOptions.__dataclass_fields__.items():
        kind = str if "template" in name else int
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=lambda text, kind=kind: text if kind is str or text == AUTO else int(text),
            default=value.default,
            help=f"default: {value.default!r}" if kind is int else "a str.format template",
        )


def run_cli(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = PairOptions(**{name: getattr(args, name) for name in PairOptions.__dataclass_fields__})
    cuda = torch.cuda.is_available()
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to("cuda" if cuda else "cpu")
    texts = load_texts(tuple(args.data), args.dataset_config, args.text_field)
    pairs = build_pairs(model, tokenizer, texts, args.recipe, options, args.work or f"{args.out}.work")
    pairs.save_to_disk(args.out)
    logger.info("saved %d LongPO pairs to %s", len(pairs), args.out)
