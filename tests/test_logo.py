"""LOGO: the loss against a hand computation (M = 1, 2), position synthesis (layout, coverage, read by the
model across the jumps), 20 training steps, `lcpatch train logo` with the paper's LoRA, the data builder
end to end (and resumed), and the errors for bad fields and rows."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lcpatch
from lcpatch import Recipe, RecipeError
from lcpatch._compat import CHECKPOINTING_ARG
from lcpatch.cli import main as cli_main
from lcpatch.data.logo import bm25_scores, build_logo_rows, read_rows
from lcpatch.errors import LcpatchError
from lcpatch.recipe import load_recipe
from lcpatch.training import LOGOTraining
from lcpatch.training.logo import LOGOCollator, LOGOConfig, LOGOTrainer, answer_log_probs
from lcpatch.training.positions import covering_offsets, synthesize_positions
from lcpatch.training.runner import run, with_overrides

from tiny_models import VOCAB, random_ids, tiny_model, tiny_tokenizer


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n))


def logo_rows(count: int, num_rejected: int = 2, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "key": f"row{i}",
            "prompt": words(rng, 4),
            "context": words(rng, 60),
            "chosen": words(rng, 5),
            "rejected": [words(rng, 4 + j) for j in range(num_rejected)],
        }
        for i in range(count)
    ]


def logo_trainer(tmp_path, model, rows, **fields) -> LOGOTrainer:
    from datasets import Dataset

    config = dict(chunk_size=16, virtual_length=256, max_length=64, learning_rate=1e-2, max_steps=20)
    args = LOGOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=5,
        **{CHECKPOINTING_ARG: False, **config, **fields},  # TRL's configs default checkpointing to on
    )
    return LOGOTrainer(model, args, Dataset.from_list(rows), tiny_tokenizer())


# -- the loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_rejected", [1, 2])
def test_loss_equals_hand_computation(tmp_path, num_rejected):
    beta, gamma_over_beta, sft_weight = 2.5, 0.4, 0.7
    model = tiny_model()
    trainer = logo_trainer(
        tmp_path,
        model,
        logo_rows(2, num_rejected),
        beta=beta,
        gamma_over_beta=gamma_over_beta,
        sft_weight=sft_weight,
        num_rejected=num_rejected,
    )
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)

    def answer_logps(i: int, positions: bool = True) -> torch.Tensor:
        """Log-probs of sequence i's answer tokens, from its own unpadded forward."""
        n = int(batch["attention_mask"][i].sum())
        ids, labels = batch["input_ids"][i, :n], batch["labels"][i, :n]
        kwargs = {"position_ids": batch["position_ids"][i, :n][None]} if positions else {}
        with torch.no_grad():
            logps = model(ids[None], attention_mask=torch.ones(1, n), **kwargs).logits[0].log_softmax(-1)
        return torch.stack([logps[t - 1, ids[t]] for t in range(n) if labels[t] != -100])

    def by_hand(positions: bool = True) -> float:
        logps = [answer_logps(i, positions) for i in range(2 * (num_rejected + 1))]
        total = 0.0
        for b in range(2):  # rows: chosen 0, chosen 1, then the j-th rejected answer of rows 0 and 1
            chosen = logps[b].mean()
            rejected = torch.stack([logps[2 * (j + 1) + b].mean() for j in range(num_rejected)]).mean()
            total += float(-F.logsigmoid(beta * (chosen - rejected - gamma_over_beta))) / 2
        chosen_tokens = torch.cat(logps[:2])
        return total + sft_weight * float(-chosen_tokens.mean())

    assert float(loss) == pytest.approx(by_hand(), rel=1e-5)
    assert float(loss) != pytest.approx(by_hand(positions=False), rel=1e-3)  # the synthesised positions were read


# -- position synthesis -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "head", "tail", "virtual"),
    [([16, 16, 16, 5], 3, 7, 400), ([512] * 15 + [100], 24, 150, 65536), ([4], 0, 2, 6)],
)
def test_synthesised_positions_layout_and_coverage(chunks, head, tail, virtual):
    width = (virtual - head - tail) // len(chunks)
    covered = [set() for _ in chunks]
    offsets = covering_offsets(chunks, tail, virtual, head)
    assert len(offsets) == -(-width // max(chunks))
    for offset in offsets:
        positions = synthesize_positions(chunks, tail, virtual, offset, head)
        assert positions.dtype == torch.int64 and len(positions) == head + sum(chunks) + tail
        assert (positions.diff() > 0).all() and positions.min() >= 0 and positions.max() == virtual - 1
        assert positions[:head].tolist() == list(range(head))  # the head where sequences start
        assert positions[-tail:].tolist() == list(range(virtual - tail, virtual))  # question + answers at the end
        start = head
        for i, n in enumerate(chunks):
            run = positions[start : start + n].tolist()
            start += n
            assert run == list(range(run[0], run[0] + n))  # one contiguous run
            assert head + i * width <= run[0] and run[-1] < head + (i + 1) * width  # inside its own span
            covered[i].update(run)
    for i, n in enumerate(chunks):  # together, the layouts reach every position of a full chunk's span
        if n == max(chunks):
            assert covered[i] == set(range(head + i * width, head + (i + 1) * width))


def test_synthesis_jumps_between_chunks_and_refuses_a_short_range():
    positions = synthesize_positions([4, 4, 4], tail_length=2, virtual_length=100, offset=0.0)
    assert (positions.diff() > 1).sum() == 3  # chunk 0 | chunk 1 | chunk 2 | tail: three jumps
    assert covering_offsets([4, 4], 2, 100, count=3) == [0.0, 0.5, 1.0]
    with pytest.raises(LcpatchError, match="raise training.virtual_length or lower training.real_length"):
        synthesize_positions([40, 40], tail_length=30, virtual_length=100, offset=0.0)
    with pytest.raises(LcpatchError, match=r"offset must be in \[0, 1\]; got 1.5"):
        synthesize_positions([4], 2, 100, 1.5)


def test_model_reads_synthesised_positions_and_attends_across_the_jumps():
    model = tiny_model()
    ids = random_ids(40)
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1 - 3) % (VOCAB - 3) + 3  # another token in chunk 0
    positions = synthesize_positions([8, 8, 8], tail_length=16, virtual_length=500, offset=0.5)[None]
    mask = torch.ones(1, 40)

    def logits(tokens, position_ids, attention_mask=mask):
        with torch.no_grad():
            return model(tokens, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits

    synthetic = logits(ids, positions)
    assert not torch.allclose(synthetic[:, 8:], logits(ids, torch.arange(40)[None])[:, 8:], atol=1e-3)
    torch.testing.assert_close(logits(ids, positions + 1000), synthetic, atol=1e-4, rtol=1e-4)  # RoPE is relative
    assert not torch.allclose(logits(changed, positions)[0, -1], synthetic[0, -1], atol=1e-4)  # tail sees chunk 0
    # Without an attention mask (and without a cache, as in training), transformers reads each jump as a
    # packed-sequence boundary and cuts attention there: what LOGOCollator's attention_mask avoids.
    unmasked = logits(ids, positions, None)
    torch.testing.assert_close(logits(changed, positions, None)[0, -1], unmasked[0, -1])
    # Under a patched RoPE (here E2-LLM at g = 4, the E2-LLM-style use) the rotary reads them too.
    seen = []
    model.model.rotary_emb.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs.get("position_ids", args[1] if len(args) > 1 else None)),
        with_kwargs=True,
    )
    with lcpatch.patched(model, {"rope": {"scaling": "e2llm", "factor": 4}}):
        logits(ids, positions)
    assert torch.equal(seen[-1], positions / 4)


def test_collator_orders_rows_and_keeps_each_rows_layout(tmp_path):
    trainer = logo_trainer(tmp_path, tiny_model(), logo_rows(2), virtual_length=1000)
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    batch = LOGOCollator(pad_token_id=0, virtual_length=1000, seed=3)(rows)
    assert batch["input_ids"].shape[0] == 6
    for i in range(6):
        row, answer = rows[i % 2], rows[i % 2]["completion_input_ids"][i // 2]  # chosen x2, rejected 1 x2, ...
        n = len(row["prompt_input_ids"]) + len(answer)
        assert batch["input_ids"][i, :n].tolist() == row["prompt_input_ids"] + answer
        assert batch["labels"][i, :n].tolist() == [-100] * len(row["prompt_input_ids"]) + answer
        assert (batch["position_ids"][i, : n - 1].diff() > 0).all()
        prompt = len(row["prompt_input_ids"])
        assert torch.equal(batch["position_ids"][i, :prompt], batch["position_ids"][i % 2, :prompt])  # same layout
    longest = max(range(0, 6, 2), key=lambda i: int(batch["attention_mask"][i].sum()))
    assert int(batch["position_ids"][longest].max()) == 999  # the longest answer ends the virtual range


def test_collator_reads_its_plain_position_share_of_rows_at_plain_positions(tmp_path):
    trainer = logo_trainer(tmp_path, tiny_model(), logo_rows(2), virtual_length=1000)
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    synthesised = LOGOCollator(0, 1000, seed=3)(rows)
    plain = LOGOCollator(0, 1000, seed=3, plain_position_share=1.0)(rows)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(plain[key], synthesised[key])
    for i, n in enumerate(plain["attention_mask"].sum(-1).tolist()):
        assert plain["position_ids"][i, :n].tolist() == list(range(n))
    for share in (0.0, 0.5, 1.0):
        collator = LOGOCollator(0, 1000, seed=0, plain_position_share=share)
        # A synthesised layout ends its longest answer at the virtual range's last position.
        plain_reads = [int(collator([rows[0]])["position_ids"].max()) < 999 for _ in range(400)]
        assert abs(sum(plain_reads) / len(plain_reads) - share) < 0.1


# -- training -----------------------------------------------------------------------------------


def test_twenty_steps_lower_the_loss_full_fine_tune(tmp_path):
    model = tiny_model().train()
    trainer = logo_trainer(tmp_path, model, logo_rows(8))
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = LOGOCollator(0, 256, seed=0)(rows)

    def loss_and_accuracy():
        model.eval()
        with torch.no_grad():
            loss = float(trainer.compute_loss(model, batch))
            sums, counts, _ = answer_log_probs(model, batch)
        rewards = (sums / counts).view(3, 8)
        return loss, float((rewards[0] > rewards[1:]).all(0).float().mean())  # chosen above each rejected

    before, _ = loss_and_accuracy()
    trainer.train()
    after, accuracy = loss_and_accuracy()
    assert trainer.state.global_step == 20
    assert after < 0.5 * before and accuracy > 0.5, (before, after, accuracy)


def test_lcpatch_train_logo_with_the_papers_lora(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model(tie_word_embeddings=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in logo_rows(4)))
    out = tmp_path / "out"
    fields = dict(model=str(folder), data=[str(data)], max_steps=2, chunk_size=16, virtual_length=512)
    fields.update(output_dir=str(out), logging_steps=1, warmup_steps=0)
    run(with_overrides("logo", fields))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (32, 16)
    assert set(adapter["modules_to_save"]) >= {"embed_tokens", "norm"}
    model = lcpatch.from_pretrained(out)
    training = lcpatch.api.patched_recipe(model).training
    assert training.method == "logo" and training.real_length == 64  # auto: the model's training length
    trained = dict(model.named_parameters())
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)  # still tied
    # The trained copies of the embeddings and norms are the saved ones, not the base's (transformers 5.17 alone
    # loads them as unexpected keys and leaves the base weights in place).
    saved = load_file(out / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(folder)
    copies = {name: p for name, p in trained.items() if "modules_to_save" in name}
    assert any("norm" in name for name in copies) and any("embed_tokens" in name for name in copies)
    for name, parameter in copies.items():
        key = "base_model.model." + name.replace(".modules_to_save.default", "")
        assert torch.equal(parameter, saved[key]), name
        assert not torch.equal(parameter, base.get_parameter(name.replace(".modules_to_save.default", ""))), name


def test_modules_to_save_that_match_no_module_are_refused(tmp_path):
    """PEFT itself trains nothing for such a name, silently."""
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in logo_rows(2)))
    fields = dict(model=str(folder), data=[str(data)], max_steps=1, output_dir=str(tmp_path / "out"))
    fields["lora"] = {"modules_to_save": ["embed_tokens", "embeds"]}
    with pytest.raises(RecipeError, match=r"training.lora.modules_to_save \['embeds'\] matches no module"):
        run(with_overrides("logo", fields))


def test_trainer_refuses_attention_that_ignores_position_ids(tmp_path):
    model = tiny_model()
    with lcpatch.patched(model, "lm-infinite"):
        with pytest.raises(LcpatchError, match="attention.method lm-infinite does not read"):
            logo_trainer(tmp_path, model, logo_rows(2))


# -- data ---------------------------------------------------------------------------------------


def test_bm25_ranks_the_chunk_holding_the_questions_words_first():
    scores = bm25_scores(["the whale swam", "a ship sailed on", "harpoon the whale whale"], "Harpoon the whale?")
    assert sorted(range(3), key=lambda i: -scores[i]) == [2, 0, 1]


def test_data_builder_end_to_end_cli_and_resume(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rng = random.Random(1)
    books = [tmp_path / f"book{i}.txt" for i in range(2)]
    for book in books:
        book.write_text(words(rng, 80))
    out, work = tmp_path / "logo.jsonl", tmp_path / "work"
    options = ["--examples", "3", "--chunk-size", "8", "--context-chunks", "4", "--keep-chunks", "1"]
    options += ["--answer-tokens", "5", "--question-tokens", "4", "--batch-size", "2", "--work", str(work)]
    assert (
        cli_main(["data", "logo", "--model", str(folder), "--data", *map(str, books), "--out", str(out), *options]) == 0
    )
    rows = read_rows([str(out)])
    assert [row["key"] for row in rows] == ["example0", "example1", "example2"]
    for row in rows:
        assert len(row["rejected"]) == 2 and row["negatives"] == ["wrong", "unfollow"]
        assert len(row["important"]) == 1 and row["prompt"] and isinstance(row["chosen"], str)
        assert len(row["context"].split()) == 32  # 4 chunks of 8 one-word tokens
    # A rerun reads every generation back from the work folder: no model call at all.
    model = tiny_model()
    model.generate = None
    texts = [book.read_text() for book in books]
    again = build_logo_rows(
        model, tiny_tokenizer(), texts, 3, chunk_size=8, context_chunks=4, keep_chunks=1, answer_tokens=5, work=work
    )
    assert again == rows


# -- recipe and errors --------------------------------------------------------------------------


def test_recipe_defaults_are_the_papers_and_round_trip():
    recipe = load_recipe("logo")
    training = recipe.training
    assert isinstance(training, LOGOTraining)
    assert (training.beta, training.gamma_over_beta, training.sft_weight, training.num_rejected) == (10, 0.3, 0.1, 2)
    assert (training.lora.r, training.lora.alpha, training.lora.modules_to_save) == (32, 16, ("embed_tokens", "norm"))
    assert training == LOGOTraining(
        model=None, output_dir="logo-output", gradient_accumulation_steps=8, warmup_steps=20
    )
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert recipe.resolve(8192).training.real_length == 8192


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"beta": 0}, r"training.beta must be a number > 0; got 0"),
        ({"gamma_over_beta": -0.1}, r"training.gamma_over_beta must be a number >= 0; got -0.1"),
        ({"sft_weight": "0.1"}, r"training.sft_weight must be a number; got '0.1' \(str\)"),
        ({"num_rejected": 0}, r"training.num_rejected must be an integer >= 1; got 0"),
        ({"chunk_size": 2.5}, r"training.chunk_size must be an integer >= 1; got 2.5"),
        ({"real_length": 8192, "virtual_length": 4096}, r"training.virtual_length must be >= training.real_length"),
        ({"real_length": "long"}, r"training.real_length must be an integer >= 2 or 'auto'; got 'long'"),
        ({"offsets_per_example": 0}, r"training.offsets_per_example must be an integer >= 1 or 'auto'; got 0"),
        ({"plain_position_share": 1.5}, r"training.plain_position_share must be a number in \[0, 1\].*got 1.5"),
        ({"trainer": "hf"}, r"training.trainer must be trl for training.method logo"),
        ({"lora": {"modules_to_save": 3}}, r"training.lora.modules_to_save must be a string or a list of strings"),
        ({"margin": 1}, r"unknown field training.margin; training accepts: method, model"),
    ],
)
def test_bad_logo_fields_name_the_field(training, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"training": {"method": "logo", **training}})


def test_logo_config_refuses_a_plain_position_share_outside_0_1(tmp_path):
    with pytest.raises(RecipeError, match=r"training.plain_position_share must be a number in \[0, 1\].*got -0.5"):
        logo_trainer(tmp_path, tiny_model(), logo_rows(2), plain_position_share=-0.5)


def test_bad_rows_name_the_fix(tmp_path):
    with pytest.raises(LcpatchError, match="has 2 rejected answer.*training.num_rejected is 3"):
        logo_trainer(tmp_path, tiny_model(), logo_rows(2), num_rejected=3)
    with pytest.raises(LcpatchError, match="no room for context in training.real_length = 12"):
        logo_trainer(tmp_path, tiny_model(), logo_rows(2), max_length=12)
