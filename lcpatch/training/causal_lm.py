"""The trainer of training.method causal-lm and e2llm: next-token loss on documents cut into
`sequence_length`-token blocks, on transformers' Trainer (trainer: hf) or TRL's SFTTrainer (trainer: trl)."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ..data import load_texts
from ..errors import RecipeError
from . import sequence_parallel
from .config import CausalLMTraining
from .packing import PaddingFreeCollator, packs_padding_free, sequence_lengths


def _blocks(texts: list[str], tokenizer, length: int, padding_free: bool) -> list[dict]:
    """Documents tokenised, joined with EOS and cut into rows of `length` tokens (the remainder dropped); with
    `padding_free`, each row also lists the lengths of the document pieces it holds (`packing.sequence_lengths`)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(row + eos for row in ids), dtype=np.int64))
    if flat.numel() < length:
        raise RecipeError(f"training.data holds {flat.numel()} tokens, fewer than training.sequence_length = {length}.")
    rows = flat[: flat.numel() // length * length].view(-1, length)
    if not padding_free:
        return [{"input_ids": row} for row in rows]
    lengths = sequence_lengths([len(row) + len(eos) for row in ids], length, len(rows))
    return [{"input_ids": row, "sequence_lengths": pieces} for row, pieces in zip(rows, lengths, strict=True)]


def _next_token_batch(rows: list[dict]) -> dict:
    ids = torch.stack([row["input_ids"] for row in rows])
    batch = {"input_ids": ids, "labels": ids.clone()}
    if sequence_parallel.configured_size() > 1:  # DeepSpeed's Ulysses loader keeps them global when it cuts rows
        batch["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids)
    return batch


def language_model_trainer(training: CausalLMTraining, model, tokenizer, settings: dict):
    """Next-token training on the documents cut into `sequence_length` blocks (causal-lm and e2llm): padding-free,
    each document attending to itself only, where the model attends with flash attention (`packing`)."""
    from transformers import Trainer, TrainingArguments

    callbacks = []
    if training.method == "e2llm":
        from .e2llm import E2LLMCallback

        callbacks.append(E2LLMCallback(training.g_max, training.sink_tokens, g_weights=training.g_weights))
    if training.sequence_length % sequence_parallel.configured_size():
        raise RecipeError(
            f"training.sequence_length {training.sequence_length} must be a multiple of the sequence-parallel size "
            f"{sequence_parallel.configured_size()} (every rank of the group holds an equal shard of each row)."
        )
    texts = load_texts(training.data, training.dataset_config, training.text_field)
    padding_free = packs_padding_free(model)
    if training.trainer == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # As the hf path: "wrapped" cuts the token stream into equal blocks; "bfd_split" packs documents into
        # rows padding-free (TRL's collator then gives restarting position ids), splitting the longer ones.
        args = SFTConfig(
            **settings,
            max_length=training.sequence_length,
            packing=True,
            packing_strategy="bfd_split" if padding_free else "wrapped",
            dataset_text_field="text",
        )
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=_blocks(texts, tokenizer, training.sequence_length, padding_free),
        data_collator=PaddingFreeCollator() if padding_free else _next_token_batch,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
