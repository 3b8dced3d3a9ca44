"""Tiny random models of every supported family (lcpatch.bench.presets builds them from configs: no downloads),
their prompts and tokenizer."""

from __future__ import annotations

import torch

from lcpatch.bench.presets import FAMILIES, TINY, tiny_model

__all__ = ["FAMILIES", "VOCAB", "CollectStreamer", "random_ids", "tiny_model", "tiny_tokenizer"]

VOCAB = TINY["vocab_size"]


def random_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def tiny_tokenizer(pad: bool = True):
    """A word-level tokenizer over the tiny vocabulary ("w3" ... "w95"), built offline. With `pad=False` it has
    no pad token (id 0 stays "<pad>", its unknown token), as tokenizers converted from GGUF files often do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, **special, bos_token="<s>", eos_token="</s>", padding_side="left"
    )


class CollectStreamer:
    """A generate() streamer that keeps what it is given: token lists, then "end"."""

    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        self.tokens.append("end")


def cpu_trainer_settings(output_dir, **overrides) -> dict:
    """Trainer arguments for a few steps of a CPU test: no reports, saves, progress bars or checkpointing (TRL's
    configs turn checkpointing on by default)."""
    from lcpatch._compat import CHECKPOINTING_ARG

    settings = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        **{CHECKPOINTING_ARG: False},
    )
    return {**settings, **overrides}
