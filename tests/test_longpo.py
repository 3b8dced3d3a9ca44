"""LongPO: the loss against a hand computation, which prompt the policy and the reference read, 20 training
steps on TRL's DPOTrainer subclass, stages through `lcpatch train`, the pair builder through
`lcpatch data longpo`, and the errors for bad training fields and builder options."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, load_from_disk
from peft import LoraConfig, get_peft_model

import lcpatch
from lcpatch import Recipe, RecipeError
from lcpatch.data.batched_generation import JsonlShards, generate_batched
from lcpatch.data.longpo import PairOptions
from lcpatch.training import LongPOTraining
from lcpatch.training.longpo import build_trainer

from tiny_models import cpu_trainer_settings, tiny_model, tiny_tokenizer

L = 64  # the tiny models' training length
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def words(rng: random.Random, n: int, low: int = 3, high: int = 96) -> str:
    return " ".join(f"w{rng.randrange(low, high)}" for _ in range(n))


def pair_rows(count: int = 8, seed: int = 0) -> list[dict]:
    """Long prompt = filler + the short prompt's chunk + filler; chosen and rejected from disjoint words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        chunk, question = words(rng, 8), words(rng, 2)
        rows.append(
            {
                "prompt_long": f"{words(rng, 20)} {chunk} {words(rng, 12)} w5 {question}",
                "prompt_short": f"{chunk} w5 {question}",
                "chosen": " " + words(rng, 5, 3, 40),  # TRL appends completions to prompts as they are
                "rejected": " " + words(rng, 5, 50, 90),
            }
        )
    return rows


def settings(tmp_path) -> dict:
    """What `lcpatch train` passes to the builder, sized for a CPU test."""
    return cpu_trainer_settings(
        tmp_path / "out",
        max_steps=20,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=5,
        remove_unused_columns=False,
        seed=0,
    )


def trainer_for(tmp_path, model, rows, **fields):
    data = tmp_path / "pairs"
    Dataset.from_list(rows).save_to_disk(str(data))
    training = LongPOTraining(data=(str(data),), **fields)
    return build_trainer(training, model, tiny_tokenizer(), settings(tmp_path))


def completion_logps(model, ids, mask, completion) -> torch.Tensor:
    """Per-token log-probs of the completion tokens (0 elsewhere), from the model's plain logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    token = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]
    return token * completion[:, 1:]


# -- the loss -----------------------------------------------------------------------------------


def test_loss_is_nll_plus_lambda_dpo_on_fixed_reference_logps(tmp_path):
    """Reference log-probs fixed in the pairs (reference: precomputed): the trainer's loss is the hand-computed
    mean NLL of the chosen tokens after the long prompt + λ · mean -log σ(β · (chosen - rejected log-ratio))."""
    rows = pair_rows(4)
    ref_chosen, ref_rejected = [-20.0, -25.0, -30.0, -18.0], [-22.0, -21.0, -35.0, -40.0]
    for row, c, r in zip(rows, ref_chosen, ref_rejected, strict=True):
        row.update(ref_chosen_logps=c, ref_rejected_logps=r)
    beta, lam = 0.5, 0.3  # not the defaults, so that each weight is checked
    model = tiny_model()
    trainer = trainer_for(tmp_path, model, rows, lora=None, beta=beta, dpo_weight=lam, reference="precomputed")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[1] > batch["short_input_ids"].shape[1]
    loss = trainer.compute_loss(model, batch)

    per_token = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    chosen_tokens, _ = per_token.chunk(2)
    chosen_mask, _ = batch["completion_mask"][:, 1:].chunk(2)
    nll = -chosen_tokens.sum() / chosen_mask.sum()
    chosen, rejected = per_token.sum(1).chunk(2)
    margin = (chosen - torch.tensor(ref_chosen)) - (rejected - torch.tensor(ref_rejected))
    dpo = -F.logsigmoid(beta * margin).mean()
    torch.testing.assert_close(loss, nll + lam * dpo, rtol=1e-5, atol=1e-5)
    assert abs(float(lam * dpo)) > 1e-3  # the DPO term is not negligible in this check


# -- which prompt each forward reads --------------------------------------------------------------


@pytest.mark.parametrize("lora", [True, False], ids=["lora-ref-adapter", "full-frozen-copy"])
def test_reference_reads_the_short_prompt_and_the_policy_the_long_one(tmp_path, lora):
    model = tiny_model()
    if lora:
        model = get_peft_model(model, LORA)
    trainer = trainer_for(tmp_path, model, pair_rows(4), lora=None)
    policy = lcpatch.models.structure.unwrap(model)
    reference = policy if lora else trainer.ref_model
    assert reference is not None and (lora or reference is not policy)
    seen = []

    def record(owner):
        def hook(module, args, kwargs):
            q_proj = module.layers[0].self_attn.q_proj
            adapter = None  # no LoRA layer, or adapters disabled
            if hasattr(q_proj, "active_adapters") and not q_proj.disable_adapters:
                adapter = q_proj.active_adapters[0]
            seen.append((owner, kwargs["input_ids"].shape[1], torch.is_grad_enabled(), adapter))

        return hook

    policy.model.register_forward_pre_hook(record("policy"), with_kwargs=True)
    if not lora:
        reference.model.register_forward_pre_hook(record("reference"), with_kwargs=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.compute_loss(model, batch).backward()

    long, short = batch["input_ids"].shape[1], batch["short_input_ids"].shape[1]
    if lora:  # one module: the reference pass runs without gradient on TRL's frozen copy of the starting adapter
        assert seen == [("policy", short, False, "ref"), ("policy", long, True, "default")]
        start = dict(policy.named_parameters())
        assert all(not start[n].requires_grad for n in start if ".ref." in n)
    else:
        assert seen == [("reference", short, False, None), ("policy", long, True, None)]


# -- training -----------------------------------------------------------------------------------


def test_twenty_steps_lower_the_loss_and_raise_reward_accuracy(tmp_path):
    """LoRA, the recipe's β = λ = 0.01: on the training pairs, before and after 20 steps."""
    model = get_peft_model(tiny_model(), LORA)
    trainer = trainer_for(tmp_path, model, pair_rows(8), lora=None)
    before = trainer.evaluate(trainer.train_dataset)
    trainer.train()
    after = trainer.evaluate(trainer.train_dataset)
    assert trainer.state.global_step == 20
    assert after["eval_loss"] < before["eval_loss"] - 0.2, (before, after)
    assert after["eval_rewards/accuracies"] > max(0.5, before["eval_rewards/accuracies"]), (before, after)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]
    logged = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    assert len(logged) == 4 and {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(logged[0])


def test_lcpatch_train_runs_each_stage_with_its_rope(tmp_path):
    """`lcpatch train longpo` with two stages: linear x2 then the recipe's linear x4, 2 steps each."""
    from lcpatch.cli.train import main

    folder = tmp_path / "model"
    model = tiny_model()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "pairs"
    Dataset.from_list(pair_rows(4)).save_to_disk(str(data))
    recipe = tmp_path / "recipe.yaml"
    spec = Recipe.from_dict(
        {
            "rope": {"scaling": "linear", "factor": 4},
            "training": {
                "method": "longpo",
                "stages": [
                    {"rope": {"scaling": "linear", "factor": 2}, "max_steps": 2},
                    {"rope": {"scaling": "linear", "factor": 4}},
                ],
            },
        }
    )
    recipe.write_text(spec.to_yaml())
    factors = []
    original = lcpatch.api.apply

    def spy(target, recipe_like):
        factors.append(lcpatch.recipe.load_recipe(recipe_like).rope.factor)
        return original(target, recipe_like)

    base_freq = model.model.rotary_emb.inv_freq.clone()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lcpatch.training.longpo, "apply", spy)
        assert (
            main(
                [
                    str(recipe),
                    "--model",
                    str(folder),
                    "--data",
                    str(data),
                    "--max-steps",
                    "3",
                    "--batch-size",
                    "2",
                    "--logging-steps",
                    "1",
                    "--output-dir",
                    str(tmp_path / "out"),
                ]
            )
            == 0
        )
    assert factors == [2, 4]
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 + 3  # the second stage takes training.max_steps
    assert [e["stage"] for e in state["log_history"] if "loss" in e] == [1, 1, 2, 2, 2]
    trained = lcpatch.from_pretrained(out)
    assert lcpatch.api.patched_recipe(trained).rope.factor == 4
    torch.testing.assert_close(trained.model.rotary_emb.inv_freq, base_freq / 4)


# -- the pair builder ---------------------------------------------------------------------------


def test_pair_builder_end_to_end_through_the_cli(tmp_path):
    """A tiny model, ~300 tokens of text, rejected answers under LM-Infinite (window 16): every pair's chosen is
    the model's greedy answer to the short prompt, its rejected the patched model's answer to the long one;
    a second run resumes from the shards without generating again."""
    from lcpatch.cli import main

    folder = tmp_path / "model"
    model, tokenizer = tiny_model(), tiny_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "book.txt"
    text.write_text(words(random.Random(1), 300, low=8))  # w5..w7 mark the templates' parts
    recipe = tmp_path / "lambda.yaml"
    recipe.write_text(Recipe.from_dict({"attention": {"method": "lm-infinite", "n_global": 2, "window": 16}}).to_yaml())
    command = ["data", "longpo", "--model", str(folder), "--data", str(text), "--out", str(tmp_path / "pairs")]
    command += ["--recipe", str(recipe), "--chunk-length", "12", "--long-length", "96", "--chunks-per-document", "2"]
    command += ["--instruction-template", "{context} w5", "--answer-template", "{context} w6 {instruction} w7"]
    command += ["--instruction-tokens", "3", "--answer-tokens", "4", "--batch-size", "4"]
    assert main(command) == 0

    pairs = load_from_disk(str(tmp_path / "pairs"))
    assert pairs.column_names[:4] == ["prompt_long", "prompt_short", "chosen", "rejected"]
    assert 1 <= len(pairs) <= 6  # 3 contexts of 96 tokens x 2 chunks, less pairs without a preference
    shards = tmp_path / "pairs.work"
    assert sorted(p.name for p in shards.iterdir()) == ["chosen", "instructions", "rejected"]
    for row in pairs:
        chunk = row["prompt_short"].split(" w6 ")[0]
        assert len(chunk.split()) == 12 and chunk in row["prompt_long"].split(" w6 ")[0]
        assert len(row["prompt_long"].split(" w6 ")[0].split()) == 96
        assert row["chosen"] != row["rejected"]
    row = pairs[0]

    def answer(prompt):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    assert row["chosen"] == " " + answer(row["prompt_short"])  # a space: TRL appends answers to prompts as they are
    with lcpatch.patched(model, recipe):
        assert row["rejected"] == " " + answer(row["prompt_long"])

    written = sorted(str(p) for p in shards.rglob("*.jsonl"))
    assert main(command) == 0  # resumed: every answer read from the shards
    assert sorted(str(p) for p in shards.rglob("*.jsonl")) == written
    assert load_from_disk(str(tmp_path / "pairs")).to_dict() == pairs.to_dict()


def test_generate_batched_keeps_prompt_order_and_resumes(tmp_path):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]
    shards = JsonlShards(tmp_path / "gen")
    first = generate_batched(model, tokenizer, prompts[:2], 3, batch_size=2, keys=["a", "b"], shards=shards)
    both = generate_batched(model, tokenizer, prompts, 3, batch_size=2, keys=["a", "b", "c", "d"], shards=shards)
    assert both[:2] == first and set(shards.done()) == {"a", "b", "c", "d"}
    assert len(list((tmp_path / "gen").glob("shard-*.jsonl"))) == 2  # the second call generated c and d only
    alone = [generate_batched(model, tokenizer, [p], 3, batch_size=1)[0] for p in prompts]
    assert both == alone  # left padding in a batch changes no answer


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"beta": 0}, r"training.beta must be a number > 0; got 0"),
        ({"dpo_weight": "0.01"}, r"training.dpo_weight must be a number > 0; got '0.01' \(str\)"),
        ({"reference": "policy"}, r"training.reference must be one of model, precomputed; got 'policy'"),
        ({"trainer": "hf"}, r"training.trainer must be trl for training.method longpo"),
        ({"stages": {"rope": {}}}, r"training.stages must be a list"),
        ({"stages": [{"rope": {"scaling": "ntk"}}]}, r"unknown rope.scaling 'ntk'"),
        (
            {"stages": [{"rope": {"scaling": "linear", "factor": 2}, "steps": 5}]},
            r"unknown field training.stages\[\].steps",
        ),
        (
            {"stages": [{"rope": {"scaling": "linear", "factor": 2}, "max_steps": 0}]},
            r"training.stages\[\].max_steps must be an integer >= 1",
        ),
        ({"nll_weight": 1}, r"unknown field training.nll_weight; training accepts: method, model"),
    ],
)
def test_bad_longpo_fields_name_value_and_accepted(training, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"training": {"method": "longpo", **training}})


def test_recipe_round_trips_and_bad_pairs_or_stages_are_refused(tmp_path):
    recipe = lcpatch.recipe.load_recipe("longpo")
    assert (recipe.training.beta, recipe.training.dpo_weight, recipe.training.reference) == (0.01, 0.01, "model")
    staged = Recipe.from_dict(
        {**recipe.to_dict(), "training": {"method": "longpo", "stages": [{"rope": {"scaling": "yarn", "factor": 2}}]}}
    )
    assert Recipe.from_yaml(staged.to_yaml()) == staged
    model = lcpatch.apply(tiny_model(), staged)
    with pytest.raises(RecipeError, match="the last of training.stages trains rope Yarn.*factor=2"):
        trainer_for(tmp_path, model, pair_rows(2), stages=staged.training.stages)
    data = tmp_path / "texts"
    Dataset.from_list([{"prompt": "w3", "chosen": "w4", "rejected": "w5"}]).save_to_disk(str(data))
    with pytest.raises(RecipeError, match="lacks the LongPO column.*prompt_long, prompt_short.*lcpatch data longpo"):
        build_trainer(LongPOTraining(data=(str(data),)), tiny_model(), tiny_tokenizer(), settings(tmp_path))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"answer_template": "{context} only"}, r"longpo.answer_template must contain \{context\} and \{instruction\}"),
        ({"chunk_length": 4}, r"longpo.chunk_length must be an integer >= 8 or 'auto'; got 4"),
        ({"batch_size": 0}, r"longpo.batch_size must be an integer >= 1; got 0"),
    ],
)
def test_bad_builder_options(options, message):
    with pytest.raises(RecipeError, match=message):
        PairOptions(**options)


def test_chunks_must_be_shorter_than_the_long_contexts_and_fit_the_documents():
    from lcpatch.data.longpo import build_pairs

    with pytest.raises(RecipeError, match=r"chunk_length \(64\) must be shorter than longpo.long_length \(32\)"):
        PairOptions(chunk_length=64, long_length=32).lengths(L)
    with pytest.raises(RecipeError, match="no document holds longpo.long_length = 256 tokens \\(the longest has 10\\)"):
        build_pairs(tiny_model(), tiny_tokenizer(), [words(random.Random(0), 10)], options=PairOptions())
