"""Passkey retrieval: a 5-digit key hidden at a chosen depth in a haystack of a chosen length.

The classic long-context probe (Mohtashami & Jaggi, 2023): the prompt is an instruction, the haystack
with the key sentence inserted at `depth` (0 = start, 1 = end), a question and the start of the answer;
the model must continue with the key. Prompts are assembled from token ids, so their length is exact.
The haystack is repeated filler sentences (`passkey_sample`) or any text (`lcpatch eval`'s --text);
`build_prompt` also serves other needles (`lcpatch eval --task needle`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.tokens import encode, padding_id
from ..errors import LcpatchError

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key?"
ANSWER_PREFIX = " The pass key is"


@dataclass
class PasskeySample:
    """One prompt (token ids) and the key it hides."""

    input_ids: list[int]
    key: str
    depth: float


def chat_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after a user message in the tokenizer's chat template; ([], []) without one."""
    if not getattr(tokenizer, "chat_template", None):
        return [], []
    marker = "\u2063LCPATCH\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    before, _, after = rendered.partition(marker)
    return encode(tokenizer, before), encode(tokenizer, after)


def build_prompt(
    tokenizer,
    haystack: list[int],
    length: int,
    depth: float,
    needle: str,
    question: str,
    answer_prefix: str,
    rng: random.Random | None = None,
) -> list[int]:
    """Exactly `length` token ids: [chat head] instruction, haystack with the needle at `depth`, question,
    [chat tail], answer prefix. The haystack is read cyclically, from a random offset drawn from `rng`
    (from its start without one)."""
    if not 0.0 <= depth <= 1.0:
        raise LcpatchError(f"depth must lie in [0, 1]; got {depth!r}.")
    before, after = chat_wrap(tokenizer)
    head = before + encode(tokenizer, INSTRUCTION)
    tail = encode(tokenizer, question) + after + encode(tokenizer, answer_prefix)
    needle_ids = encode(tokenizer, needle)
    room = length - len(head) - len(needle_ids) - len(tail)
    if room < 0:
        raise LcpatchError(f"a prompt needs at least {length - room} tokens with this tokenizer; got length {length}.")
    start = rng.randrange(len(haystack)) if rng is not None else 0
    filler = [haystack[(start + i) % len(haystack)] for i in range(room)]
    split = round(depth * room)
    return head + filler[:split] + needle_ids + filler[split:] + tail


def passkey_prompt(
    tokenizer, haystack: list[int], length: int, depth: float, key: str, rng: random.Random | None = None
) -> list[int]:
    """The passkey prompt of exactly `length` tokens hiding `key` in `haystack` (see `build_prompt`)."""
    return build_prompt(tokenizer, haystack, length, depth, NEEDLE.format(key=key), QUESTION, ANSWER_PREFIX, rng)


def passkey_sample(tokenizer, length: int, depth: float, key: str) -> PasskeySample:
    """A prompt of exactly `length` tokens with `key` at relative `depth` of repeated FILLER."""
    prompt = passkey_prompt(tokenizer, encode(tokenizer, FILLER), length, depth, key)
    return PasskeySample(prompt, key, depth)


def random_key(rng: random.Random) -> str:
    """A 5-digit key that does not start with 0 (its tokenisation stays the same at any position)."""
    return str(rng.randint(10_000, 99_999))


def score_passkey(generated: str, key: str) -> bool:
    """Correct when the first number in the generation is exactly the key ('12345.' yes, '123456' no).
    Spaces are ignored, so a tokenizer that decodes digit by digit ('1 2 3 4 5') is read the same way."""
    match = re.search(r"\d+", generated.replace(" ", ""))
    return match is not None and match.group(0) == key


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """The greedy continuations (decoded, special tokens dropped) of prompts of one length, as one batch."""
    ids = torch.tensor(prompts, device=next(model.parameters()).device)
    pad = padding_id(tokenizer)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )
    return [tokenizer.decode(new, skip_special_tokens=True) for new in out[:, ids.shape[1] :]]


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

    Prompts are `passkey_sample`s, scored by `score_passkey` on 8 greedy tokens. Samples of one length run
    in batches of `batch_size` (equal lengths: no padding).
    """
    rng = random.Random(seed)
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
                    texts = greedy_answers(model, tokenizer, [s.input_ids for s in group], max_new_tokens=8)
                    for sample, text in zip(group, texts, strict=True):
                        hit = score_passkey(text, sample.key)
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
    answer = encode(tokenizer, " " + sample.key) + [tokenizer.eos_token_id]
    return sample.input_ids + answer, [-100] * len(sample.input_ids) + answer
