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


def _blocks(texts: list[str], tokenizer, length: int) -> list[dict]:
    """Documents tokenised, joined with EOS and cut into rows of `length` tokens (the remainder dropped)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(row + eos for row in ids), dtype=np.int64))
    if flat.numel() < length:
        raise RecipeError(f"training.data holds {flat.numel()} tokens, fewer than training.sequence_length = {length}.")
    return [{"input_ids": row} for row in flat[: flat.numel() // length * length].view(-1, length)]


def _next_token_batch(rows: list[dict]) -> dict:
    ids = torch.stack([row["input_ids"] for row in rows])
    batch = {"input_ids": ids, "labels": ids.clone()}
    if sequence_parallel.configured_size() > 1:  # DeepSpeed's Ulysses loader keeps them global when it cuts rows
        batch["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids)
    return batch


def language_model_trainer(training: CausalLMTraining, model, tokenizer, settings: dict):
    """Next-token training on the documents cut into `sequence_length` blocks (causal-lm and e2llm)."""
    from transformers import Trainer, TrainingArguments

    callbacks = []
    if training.method == "e2llm":
        from .e2llm import E2LLMCallback

        callbacks.append(E2LLMCallback(training.g_max, training.sink_tokens))
    if training.sequence_length % sequence_parallel.configured_size():
        raise RecipeError(
            f"training.sequence_length {training.sequence_length} must be a multiple of the sequence-parallel size "
            f"{sequence_parallel.configured_size()} (every rank of the group holds an equal shard of each row)."
        )
    texts = load_texts(training.data, training.dataset_config, training.text_field)
    if training.trainer == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # "wrapped" packing cuts the token stream into equal blocks, as the hf path does.
        args = SFTConfig(
            **settings,
            max_length=training.sequence_length,
            packing=True,
            packing_strategy="wrapped",
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
        train_dataset=_blocks(texts, tokenizer, training.sequence_length),
        data_collator=_next_token_batch,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
