"""Tokenizers without a pad token. One converted from a GGUF file usually has none (pad_token_id is None), and
LOGO's collator crashed on it (`torch.full(..., None)`). Every data builder, collator and trainer here runs on a
tokenizer with EOS but no pad token and pads with `lcpatch.data.tokens.padding_id` (the pad token, else EOS);
generation and LOGO's log-probs come out as with a pad token. A tokenizer with neither gets an LcpatchError
that says how to set one."""

from __future__ import annotations

import json
import random

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig

from lcpatch import Recipe
from lcpatch.data import generate_batched, tokens
from lcpatch.data.logo import build_logo_rows, write_rows
from lcpatch.data.longpo import PairOptions, build_pairs
from lcpatch.errors import LcpatchError
from lcpatch.eval.passkey import greedy_answers
from lcpatch.training import LongPOTraining
from lcpatch.training.logo import LOGOCollator, LOGOConfig, LOGOTrainer, answer_log_probs, tokenize_logo_row
from lcpatch.training.longpo import LongPOTrainer
from lcpatch.training.longpo import build_trainer as longpo_trainer
from lcpatch.training.runner import run, with_overrides

from tiny_models import VOCAB, cpu_trainer_settings, tiny_model, tiny_tokenizer

EOS = 2
LONG_RECIPE = {"attention": {"method": "lm-infinite", "n_global": 2, "window": 16}}  # the rejected answers
PAIRS = PairOptions(
    chunk_length=12,
    long_length=96,
    chunks_per_document=2,
    instruction_template="{context} w5",
    answer_template="{context} w6 {instruction} w7",
    instruction_tokens=3,
    answer_tokens=4,
    batch_size=4,
)


def words(seed: int, n: int, low: int = 3) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(low, VOCAB)}" for _ in range(n))


@pytest.fixture
def tok():
    tokenizer = tiny_tokenizer(pad=False)
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id == EOS
    return tokenizer


@pytest.fixture(scope="module")
def logo_rows() -> list[dict]:
    texts = [words(1, 80), words(2, 80)]
    options = dict(chunk_size=8, context_chunks=4, keep_chunks=1, answer_tokens=5, question_tokens=4, batch_size=2)
    return build_logo_rows(tiny_model(), tiny_tokenizer(pad=False), texts, 3, **options)  # answers: batches padded


@pytest.fixture(scope="module")
def pairs() -> Dataset:
    texts = [words(3, 300, low=8)]  # w5..w7 mark the templates' parts
    return build_pairs(tiny_model(), tiny_tokenizer(pad=False), texts, LONG_RECIPE, PAIRS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama saved with a tokenizer that has no pad token, as `lcpatch train --model` reads it."""
    folder = tmp_path_factory.mktemp("models") / "no-pad"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer(pad=False).save_pretrained(folder)
    return folder


# -- data builders and generation ---------------------------------------------------------------


def test_generate_batched_and_greedy_answers_pad_with_eos(tok):
    model = tiny_model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]
    batched = generate_batched(model, tok, prompts, 4, batch_size=4)  # one batch: three prompts left-padded
    assert batched == [generate_batched(model, tok, [p], 4, batch_size=1)[0] for p in prompts]
    assert batched == generate_batched(model, tiny_tokenizer(), prompts, 4, batch_size=4)
    same_length = [[5, 6, 7], [8, 9, 10]]
    assert greedy_answers(model, tok, same_length, 4) == greedy_answers(model, tiny_tokenizer(), same_length, 4)


def test_logo_builder_writes_rows(logo_rows):
    assert [row["key"] for row in logo_rows] == ["example0", "example1", "example2"]
    assert all(len(row["rejected"]) == 2 and len(row["context"].split()) == 32 for row in logo_rows)


def test_longpo_builder_writes_pairs(pairs):
    assert pairs.column_names[:4] == ["prompt_long", "prompt_short", "chosen", "rejected"]
    assert len(pairs) >= 2 and all(row["chosen"] != row["rejected"] for row in pairs)


# -- LOGO's collator: the path that crashed ------------------------------------------------------


def test_logo_collator_pads_with_eos_and_scores_answers_as_with_a_pad_token(tok, logo_rows):
    """As benchmarks/logo-smollm2/run.py's preference_accuracy: tokenise rows, collate, score the answers."""
    model = tiny_model()
    tokenised = [tokenize_logo_row(tok, row, 2, chunk_size=8, real_length=64) for row in logo_rows]
    batch = LOGOCollator(tokens.padding_id(tok), virtual_length=256, seed=0)(tokenised)
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["input_ids"][padded] == EOS).all()
    sums, counts, _ = answer_log_probs(model, batch)
    assert torch.isfinite(sums).all() and (counts > 0).all()
    with_pad = LOGOCollator(tiny_tokenizer().pad_token_id, virtual_length=256, seed=0)(tokenised)
    assert not torch.equal(with_pad["input_ids"], batch["input_ids"])
    torch.testing.assert_close(answer_log_probs(model, with_pad)[0], sums)  # padding is masked out


# -- trainers -----------------------------------------------------------------------------------


def test_logo_trainer_trains(tmp_path, tok, logo_rows):
    model = tiny_model().train()
    args = LOGOConfig(
        **cpu_trainer_settings(tmp_path / "out"), bf16=False, chunk_size=8, virtual_length=256, max_length=64
    )
    trainer = LOGOTrainer(model, args, Dataset.from_list(logo_rows), tok)
    assert trainer.data_collator.pad_token_id == EOS
    trainer.train()
    assert trainer.state.global_step == 2


def test_longpo_trainer_trains_and_pads_with_eos(tmp_path, tok, pairs):
    pairs.save_to_disk(str(tmp_path / "pairs"))
    training = LongPOTraining(data=(str(tmp_path / "pairs"),), lora=None)
    trainer = longpo_trainer(
        training, tiny_model(), tok, {**cpu_trainer_settings(tmp_path / "out"), "remove_unused_columns": False}
    )
    assert isinstance(trainer, LongPOTrainer) and tok.pad_token_id == EOS  # TRL pads with the tokenizer's pad token
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("method", ["causal-lm", "e2llm", "longpo", "logo"])
def test_lcpatch_train_runs_from_a_folder_without_pad_token(tmp_path, model_dir, logo_rows, pairs, method):
    if method == "longpo":
        pairs.save_to_disk(str(tmp_path / "data"))
        data, recipe = tmp_path / "data", "longpo"
    elif method == "logo":
        data, recipe = write_rows(logo_rows, tmp_path / "rows.jsonl"), "logo"
    else:
        (data := tmp_path / "book.txt").write_text(words(4, 400))
        # causal-lm on TRL's SFTTrainer (it pads with the tokenizer's pad token), e2llm on transformers' Trainer
        recipe = (
            Recipe.from_dict({"training": {"method": "causal-lm", "trainer": "trl"}})
            if method == "causal-lm"
            else "e2llm"
        )
    fields = dict(model=str(model_dir), data=[str(data)], output_dir=str(tmp_path / "out"), max_steps=2, batch_size=2)
    fields.update(logging_steps=1, warmup_steps=0, gradient_accumulation_steps=1)
    fields.update({"logo": dict(chunk_size=8, virtual_length=256)}.get(method, {}))
    if method in ("causal-lm", "e2llm"):
        fields["sequence_length"] = 32
    out = run(with_overrides(recipe, fields))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


# -- neither pad nor EOS --------------------------------------------------------------------------


def test_a_tokenizer_with_neither_pad_nor_eos_gets_the_fix(tmp_path, tok):
    tok.eos_token = None
    assert tok.eos_token_id is None
    fix = r"neither a pad nor an EOS token.*set one first, e\.g\. tokenizer\.pad_token ="
    model = tiny_model()
    with pytest.raises(LcpatchError, match=fix):
        tokens.padding_id(tok)
    with pytest.raises(LcpatchError, match=fix):
        generate_batched(model, tok, [[5, 6], [7]], 2)
    with pytest.raises(LcpatchError, match=fix):
        greedy_answers(model, tok, [[5, 6]], 2)
    with pytest.raises(LcpatchError, match=fix):
        LOGOTrainer(model, LOGOConfig(**cpu_trainer_settings(tmp_path / "out")), Dataset.from_list([]), tok)
    with pytest.raises(LcpatchError, match=fix):
        LongPOTrainer(model, args=DPOConfig(**cpu_trainer_settings(tmp_path / "out")), processing_class=tok)
    tok.save_pretrained(tmp_path / "neither")
    with pytest.raises(LcpatchError, match=fix):
        run(with_overrides("e2llm", dict(model=str(tmp_path / "neither"), data=["unread.txt"])))
    tok.pad_token = "<pad>"  # the fix
    assert tokens.padding_id(tok) == 0


def test_logo_collator_refuses_a_missing_pad_id():
    row = {"prompt_input_ids": [5, 6, 7], "head_length": 0, "chunk_lengths": [2], "completion_input_ids": [[8], [9]]}
    with pytest.raises(LcpatchError, match=r"pad_token_id must be a token id, not None.*padding_id\(tokenizer\)"):
        LOGOCollator(tiny_tokenizer(pad=False).pad_token_id, virtual_length=64)([row])
