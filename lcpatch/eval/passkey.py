"""Passkey retrieval: a 5-digit key hidden at a chosen depth in filler text of a chosen length.

The classic long-context probe (Mohtashami & Jaggi, 2023): the prompt is an instruction, filler
sentences with the key sentence inserted at `depth` (0 = start, 1 = end), and a question; the model
must continue with the key. Prompts are assembled from token ids, so their length is exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import LcpatchError

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeySample:
    """One prompt (token ids) and the key it hides."""

    input_ids: list[int]
    key: str
    depth: float


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_sample(tokenizer, length: int, depth: float, key: str) -> PasskeySample:
    """A prompt of exactly `length` tokens with `key` at relative `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise LcpatchError(f"depth must lie in [0, 1]; got {depth!r}.")
    head, needle, question = (_encode(tokenizer, t) for t in (INSTRUCTION, NEEDLE.format(key=key), QUESTION))
    room = length - len(head) - len(needle) - len(question)
    if room < 0:
        raise LcpatchError(f"a passkey prompt needs at least {length - room} tokens; got length {length}.")
    unit = _encode(tokenizer, FILLER)
    filler = (unit * (room // len(unit) + 1))[:room]
    split = round(depth * room)
    return PasskeySample(head + filler[:split] + needle + filler[split:] + question, key, depth)


def random_key(rng: random.Random) -> str:
    """A 5-digit key that does not start with 0 (its tokenisation stays the same at any position)."""
    return str(rng.randint(10_000, 99_999))


@torch.no_grad()
def passkey_accuracy(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int = 0,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Fraction of correct keys per (length, depth): {"accuracy": {length: {depth: float}}, "answers": [...]}.

    A sample is correct when the greedy continuation starts with the key (spaces ignored). Samples of
    one length run in batches of `batch_size` (equal lengths: no padding).
    """
    rng = random.Random(seed)
    device = next(model.parameters()).device
    accuracy: dict[int, dict[float, float]] = {}
    answers = []
    total = len(lengths) * len(depths) * samples
    with tqdm(total=total, desc="passkey", unit="prompt", disable=not progress) as bar:
        for length in lengths:
            accuracy[length] = {}
            for depth in depths:
                batch = [passkey_sample(tokenizer, length, depth, random_key(rng)) for _ in range(samples)]
                correct = 0
                for start in range(0, samples, batch_size):
                    group = batch[start : start + batch_size]
                    ids = torch.tensor([s.input_ids for s in group], device=device)
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=8,
                        do_sample=False,
                        pad_token_id=tokenizer.eos_token_id,
                    )
                    for sample, new in zip(group, out[:, ids.shape[1] :], strict=True):
                        text = tokenizer.decode(new, skip_special_tokens=True)
                        hit = text.replace(" ", "").startswith(sample.key)
                        correct += hit
                        answers.append(
                            {"length": length, "depth": depth, "key": sample.key, "answer": text, "correct": hit}
                        )
                    bar.update(len(group))
                accuracy[length][depth] = correct / samples
    return {"accuracy": accuracy, "answers": answers}


def training_example(tokenizer, length: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one passkey prompt of `length` tokens followed by its key; only the key is learnt."""
    sample = passkey_sample(tokenizer, length, rng.random(), random_key(rng))
    answer = _encode(tokenizer, " " + sample.key) + [tokenizer.eos_token_id]
    return sample.input_ids + answer, [-100] * len(sample.input_ids) + answer
