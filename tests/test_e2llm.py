"""E2-LLM: the position transform against the paper's formulas, inference g (fixed / auto at prefill,
dense and Λ), the training augmentation through HF Trainer, TRL SFTTrainer and PEFT, a 2-process
`accelerate launch` run of `lcpatch.cli.train`, and the errors for bad training fields."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lcpatch
from lcpatch import Recipe, RecipeError
from lcpatch.errors import LcpatchError
from lcpatch.rope.e2llm import e2llm_positions_of
from lcpatch.training import E2LLMTraining
from lcpatch.training.e2llm import (
    E2LLMAugmentation,
    E2LLMCallback,
    e2llm_positions,
    start_augmentation,
    stop_augmentation,
)
from lcpatch.training.runner import with_overrides

from tiny_models import cpu_trainer_settings, random_ids, tiny_model, tiny_tokenizer

L = 32
FIXTURE = Path(__file__).parent / "fixtures" / "tiny-e2llm"
E2LLM = {"rope": {"scaling": "e2llm"}}


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def record_rope_positions(model) -> list[torch.Tensor]:
    """Positions each rotary call computes RoPE at (after lcpatch's pre-hook)."""
    seen: list[torch.Tensor] = []
    model.model.rotary_emb.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs.get("position_ids", args[1] if len(args) > 1 else None)),
        with_kwargs=True,
    )
    return seen


# -- the transform and its draws ----------------------------------------------------------------


def test_transform_is_m_plus_t_over_g_with_sinks():
    m = torch.arange(8).repeat(2, 1)
    out = e2llm_positions(m, g=torch.tensor([2.0, 4.0]), t=torch.tensor([10.0, 0.0]), sink_tokens=4)
    assert out.dtype == torch.float32
    assert out[0].tolist() == [0, 0.5, 1, 1.5, 7, 7.5, 8, 8.5]  # 0..3 keep t = 0; then (m + 10) / 2
    assert out[1].tolist() == [m / 4 for m in range(8)]
    packed = e2llm_positions(
        torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]), torch.tensor([1.0]), torch.tensor([5.0]), 2
    )
    assert packed[0].tolist() == [0, 1, 7, 8, 9, 0, 1, 7, 8, 9]  # every packed sequence keeps its own sinks


def test_draws_cover_the_paper_ranges_uniformly():
    g_max, length, rows = 8, 24, 40_000
    augmentation = E2LLMAugmentation(g_max, training_length=L, sink_tokens=4, seed=0)
    g, t = augmentation.draw(torch.full((rows,), length))
    assert set(g.unique().tolist()) == set(range(1, g_max + 1))
    assert torch.equal(t, t.floor()) and (t >= 0).all() and (t <= g * L - length).all()
    # Uniform g: each value within 5 sigma of rows / g_max.
    counts = torch.bincount(g.long(), minlength=g_max + 1)[1:].double()
    sigma = math.sqrt(rows * (1 / g_max) * (1 - 1 / g_max))
    assert (counts - rows / g_max).abs().max() < 5 * sigma
    # Uniform t on {0..g·L - R}: its normalised value has mean 1/2 and variance ~1/12, both ends reached.
    for value in (2, g_max):
        pick = g == value
        top = value * L - length
        u = t[pick] / top
        assert abs(float(u.mean()) - 0.5) < 0.03 and abs(float(u.var()) - 1 / 12) < 0.01
        assert float(t[pick].min()) == 0 and float(t[pick].max()) == top
    # Every RoPE position stays inside the trained range [0, L).
    positions = augmentation(torch.arange(length).repeat(64, 1))
    assert positions.max() < L and torch.equal(positions[:, :4] * 0, torch.zeros(64, 4))


def test_g_weights_set_how_often_each_scale_is_drawn():
    rows, weights = 40_000, (3, 1, 0, 4)
    g, t = E2LLMAugmentation(4, training_length=L, seed=0, g_weights=weights).draw(torch.full((rows,), 24))
    counts = torch.bincount(g.long(), minlength=5)[1:].double()
    for count, weight in zip(counts.tolist(), weights, strict=True):
        p = weight / sum(weights)
        assert abs(count - rows * p) <= 5 * math.sqrt(rows * p * (1 - p))
    assert counts[2] == 0 and (t <= g * L - 24).all()


@pytest.mark.parametrize(
    "weights, message",
    [
        ((1, 1), "must be 4 numbers"),
        ((1, -1, 1, 1), "non-negative"),
        ((0, 0, 0, 0), "not all zero"),
        ((1, float("nan"), 1, 1), "finite"),
        ((1, 1, float("inf"), 1), "finite"),
        ("1", "a list"),
    ],
)
def test_bad_g_weights_name_the_value_and_the_fix(weights, message):
    with pytest.raises(RecipeError, match=message):
        E2LLMTraining(model="m", data=["x.txt"], g_max=4, g_weights=weights)
    if not isinstance(weights, str):
        with pytest.raises(LcpatchError, match=message):
            E2LLMAugmentation(4, training_length=L, g_weights=weights)


def test_g_weights_reach_the_trainers_draws(tmp_path):
    from lcpatch.training.causal_lm import language_model_trainer

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{3 + i % 90}" for i in range(400)))
    fields = {"model": "unread", "data": [str(text)], "sequence_length": 16, "g_max": 2, "g_weights": [0, 1]}
    recipe = with_overrides("e2llm", fields)
    assert Recipe.from_yaml(recipe.to_yaml()).training.g_weights == (0, 1)
    model = lcpatch.apply(tiny_model(max_position_embeddings=L), E2LLM)
    trainer = language_model_trainer(recipe.training, model, tiny_tokenizer(), cpu_trainer_settings(tmp_path))
    (callback,) = (c for c in trainer.callback_handler.callbacks if isinstance(c, E2LLMCallback))
    callback.on_train_begin(trainer.args, None, None, model=model)
    g, _ = e2llm_positions_of(model).augmentation.draw(torch.full((64,), 8))
    assert set(g.tolist()) == {2.0}  # g = 1 has weight 0


def test_g_is_one_and_t_zero_when_there_is_no_room():
    g, t = E2LLMAugmentation(1, training_length=L).draw(torch.tensor([L, L + 10]))
    assert g.tolist() == [1, 1] and t.tolist() == [0, 0]


# -- inference ----------------------------------------------------------------------------------


def test_inference_g_fixed_and_auto_chosen_from_the_input_length():
    model = tiny_model(max_position_embeddings=L)
    seen = record_rope_positions(model)
    short, long = random_ids(L), random_ids(2 * L + 1)
    plain = logits(model, short)
    with lcpatch.patched(model, E2LLM):
        assert torch.equal(logits(model, short), plain)  # g = 1 within the training length
        logits(model, long)
        assert torch.equal(seen[-1], torch.arange(2 * L + 1)[None] / 3)  # g = ceil(65 / 32)
        logits(model, long[:, :8], position_ids=torch.arange(1, 9)[None])
        assert torch.equal(seen[-1], torch.arange(1, 9)[None] / 3)  # no new sequence (no position 0): g kept
    with lcpatch.patched(model, {"rope": {"scaling": "e2llm", "factor": 8}}):
        logits(model, short)
        assert torch.equal(seen[-1], torch.arange(L)[None] / 8)


@pytest.mark.parametrize("attention", ["dense", "lm-infinite"])
def test_auto_g_is_chosen_at_prefill_for_the_whole_generation(attention):
    """generate() prefills in chunks: the first chunk must already use g for prompt + new tokens."""
    model = tiny_model(max_position_embeddings=L)
    prompt = random_ids(50)
    chunked = {"generation": {"prefill_chunk": 16}, "attention": {"method": attention}}
    with lcpatch.patched(model, {**E2LLM, **chunked}):
        auto = model.generate(prompt, max_new_tokens=6, do_sample=False)
    with lcpatch.patched(model, {"rope": {"scaling": "e2llm", "factor": 2}, **chunked}):
        fixed = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(auto, fixed)


def test_composes_with_lm_infinite_fixed_and_auto():
    model = tiny_model(max_position_embeddings=L)
    ids = random_ids(3 * L)
    lam = {"method": "lm-infinite", "window": 2 * L}
    with lcpatch.patched(model, {"rope": {"scaling": "linear", "factor": 3}, "attention": lam}):
        linear = logits(model, ids)
    with lcpatch.patched(model, {"rope": {"scaling": "e2llm", "factor": 3}, "attention": lam}):
        assert torch.equal(logits(model, ids), linear)
    with lcpatch.patched(model, {**E2LLM, "attention": lam}):
        base = model.model.rotary_emb.inv_freq
        rotaries = lcpatch.api._PATCHED[model].structure.rotaries
        assert torch.equal(logits(model, ids), linear)  # auto: g = ceil(96 / 32) = 3
        assert torch.allclose(rotaries[0].inv_freq, base / 3)
        logits(model, ids[:, :L])
        assert torch.allclose(rotaries[0].inv_freq, base)
        with pytest.raises(LcpatchError, match="E2-LLM training needs attention.method dense"):
            start_augmentation(model, g_max=4)


def test_composes_with_infllm_in_one_recipe():
    """E2-LLM weights + InfLLM memory: InfLLM rotates its blocks with the tables E2-LLM scales."""
    model = tiny_model()
    ids = random_ids(200)
    with lcpatch.patched(model, {"attention": {"method": "infllm"}, "rope": {"scaling": "linear", "factor": 2}}):
        linear = logits(model, ids)
    with lcpatch.patched(model, {"attention": {"method": "infllm"}, "rope": {"scaling": "e2llm", "factor": 2}}):
        assert torch.equal(logits(model, ids), linear)


# -- training -----------------------------------------------------------------------------------


def test_training_forward_draws_per_row_and_eval_is_unchanged():
    model = tiny_model(max_position_embeddings=L)
    seen = record_rope_positions(model)
    ids = random_ids(24, batch=3)
    with lcpatch.patched(model, E2LLM):
        start_augmentation(model, g_max=4, seed=7)
        model.train()
        logits(model, ids)
        expected = E2LLMAugmentation(4, L, seed=7)(torch.arange(24).expand(3, 24))
        assert torch.equal(seen[-1], expected)
        assert len({tuple(row.tolist()) for row in seen[-1]}) > 1  # each row has its own (g, t)
        model.eval()
        logits(model, ids)
        assert torch.equal(seen[-1], torch.arange(24)[None])
        stop_augmentation(model)


def test_gemma3_draws_once_per_forward_for_both_layer_types():
    model = tiny_model("gemma3", max_position_embeddings=L).train()
    seen = record_rope_positions(model)
    with lcpatch.patched(model, E2LLM):
        start_augmentation(model, g_max=8, seed=3)
        logits(model, random_ids(20, batch=2))
        assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_augmented_training_keeps_integer_positions_for_the_mask():
    """A TRL padding-free row packs sequences, found by transformers from integer position_ids."""
    model = tiny_model(max_position_embeddings=L).train()
    seen = record_rope_positions(model)
    first, second = random_ids(12, seed=1), random_ids(10, seed=2)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(12), torch.arange(10)])[None]
    other = torch.cat([first, random_ids(10, seed=3)], dim=1)
    with lcpatch.patched(model, E2LLM):
        start_augmentation(model, g_max=4, seed=0)
        a = logits(model, packed, position_ids=positions, use_cache=False)
        rope = seen[-1][0]
        start_augmentation(model, g_max=4, seed=0)  # the same draw for the second input
        b = logits(model, other, position_ids=positions, use_cache=False)
        # g = 1 and R = L leave no room for t: training positions are the plain ones.
        start_augmentation(model, g_max=1)
        full = random_ids(L)
        assert torch.equal(logits(model, full), logits(tiny_model(max_position_embeddings=L).train(), full))
    # The second packed sequence is invisible to the first: transformers still found the packing.
    assert torch.equal(a[0, :12], b[0, :12])
    torch.testing.assert_close(rope[12:16], torch.arange(4) * rope[13])  # its sinks keep t = 0


def test_hf_trainer_with_peft_lora_and_callback(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = tiny_model(max_position_embeddings=L)
    lcpatch.apply(model, E2LLM)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    seen = record_rope_positions(model)
    ids = random_ids(L, batch=8).tolist()
    trainer = Trainer(
        model=peft_model,
        args=TrainingArguments(**cpu_trainer_settings(tmp_path), remove_unused_columns=False),
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        callbacks=[E2LLMCallback(g_max=4)],
    )
    trainer.train()
    assert any(not torch.equal(p, p.round()) for p in seen)  # fractional RoPE positions were trained
    assert lcpatch.rope.e2llm.e2llm_positions_of(peft_model).augmentation is None  # off after training


@pytest.mark.skipif(
    not (FIXTURE / "tokenizer.json").is_file(), reason="needs tests/fixtures/tiny-e2llm (benchmarks/e2llm-tiny/run.py)"
)
def test_trl_sft_trainer_packed_with_callback(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = lcpatch.from_pretrained(FIXTURE)
    seen = record_rope_positions(model)
    texts = ["Call me Ishmael. Some years ago.", "It was the best of times.", "Happy families are all alike."] * 4
    config = SFTConfig(**cpu_trainer_settings(tmp_path), max_length=64, packing=True)  # bfd: padding-free rows
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=AutoTokenizer.from_pretrained(FIXTURE),
        callbacks=[E2LLMCallback(g_max=8)],
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    trained = [p for p in seen if p is not None and p.dtype == torch.float32]
    assert trained and all(p.max() < 256 for p in trained)


# -- lcpatch.cli.train: YAML + flags, 2 processes ------------------------------------------------------


def test_every_training_method_has_a_trainer_that_imports():
    from lcpatch.training import TRAINING_METHODS

    for name in TRAINING_METHODS.names():
        assert callable(TRAINING_METHODS[name].trainer_builder())


def test_training_run_checks_the_versions_of_the_libraries_it_uses():
    from lcpatch.training import TRAINING_METHODS
    from lcpatch.training.runner import training_packages

    assert training_packages(TRAINING_METHODS["e2llm"]()) == ["accelerate", "peft"]
    assert training_packages(TRAINING_METHODS["e2llm"](lora=None)) == ["accelerate"]
    assert training_packages(TRAINING_METHODS["causal-lm"](trainer="trl")) == ["accelerate", "peft", "trl"]
    for method in ("longpo", "logo"):
        assert "trl" in training_packages(TRAINING_METHODS[method]())


def test_flags_override_the_recipe():
    import argparse

    from lcpatch.cli.train import add_arguments
    from lcpatch.training.runner import with_overrides

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["e2llm", "--g-max", "8", "--lora", "null", "--learning-rate", "2e-4", "--data", "[a.txt, b]"]
    )
    overrides = {k: v for k, v in vars(args).items() if k != "recipe"}
    training = with_overrides(args.recipe, overrides).training
    assert (training.g_max, training.lora, training.learning_rate, training.data) == (8, None, 2e-4, ("a.txt", "b"))
    assert training.sequence_length == "auto" and training.sink_tokens == 4
    with pytest.raises(RecipeError, match=r"training.g_max must be an integer >= 1; got 0"):
        with_overrides("e2llm", {"g_max": 0})
    with pytest.raises(RecipeError, match="has no training section"):
        with_overrides("lm-infinite", {})


@pytest.mark.distributed
@pytest.mark.skipif(
    not (FIXTURE / "tokenizer.json").is_file(), reason="needs tests/fixtures/tiny-e2llm (benchmarks/e2llm-tiny/run.py)"
)
def test_accelerate_launch_two_cpu_processes_trains_and_saves(tmp_path):
    data = tmp_path / "book.txt"
    data.write_text((FIXTURE / "heldout.txt").read_text() * 2)
    out = tmp_path / "out"
    # accelerate's --cpu starts a single process (multi-CPU needs mpirun); --multi_gpu on a machine without
    # GPUs starts torchrun processes, which train on CPU over gloo.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lcpatch.cli.train",
        "e2llm",
        "--model",
        str(FIXTURE),
        "--data",
        str(data),
        "--sequence-length",
        "64",
        "--g-max",
        "8",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--logging-steps",
        "1",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # cwd outside the repository: its top-level kernels/ folder would shadow the `kernels` package transformers probes.
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes (gloo)" in result.stderr
    assert "terminate called" not in result.stderr  # a rank aborting at exit is a failure even when rc is 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "lcpatch_recipe.yaml").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    model = lcpatch.from_pretrained(out)
    assert lcpatch.api.patched_recipe(model).rope.scaling == "e2llm"
    assert lcpatch.api.patched_recipe(model).training.sequence_length == 64


@pytest.mark.skipif(
    not (FIXTURE / "heldout.txt").is_file(), reason="needs tests/fixtures/tiny-e2llm (benchmarks/e2llm-tiny/run.py)"
)
def test_tiny_e2llm_model_reads_8x_its_training_length():
    """The fixture was trained at 256 bytes with E2-LLM (g_max = 8, benchmarks/e2llm-tiny/run.py). Measured on these
    4 KB: 21.3 at 256, 21.3 at 2048 with g = 8 (auto), 26.5 at 2048 with its plain positions (g = 1)."""
    model = lcpatch.from_pretrained(FIXTURE)
    ids = torch.tensor(list((FIXTURE / "heldout.txt").read_bytes()[:4096]))

    def ppl(length):
        windows = ids[: ids.numel() // length * length].view(-1, length)
        out = logits(model, windows)[:, :-1]
        return math.exp(torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), windows[:, 1:].reshape(-1)))

    short, long = ppl(256), ppl(2048)
    lcpatch.remove(model)
    plain = ppl(2048)
    assert long < 1.1 * short and long < 0.9 * plain, (short, long, plain)


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"method": "e2llm", "g_max": 0}, r"training.g_max must be an integer >= 1; got 0"),
        ({"method": "e2llm", "g_max": 2.5}, r"training.g_max must be an integer >= 1; got 2.5 \(float\)"),
        ({"method": "e2llm", "sink_tokens": -1}, r"training.sink_tokens must be an integer >= 0; got -1"),
        ({"method": "e2llm", "trainer": "deepspeed"}, r"training.trainer must be one of hf, trl; got 'deepspeed'"),
        (
            {"method": "e2llm", "lora": {"rank": 8}},
            r"unknown field training.lora.rank; training.lora accepts: r, alpha",
        ),
        ({"method": "e2llm", "learning_rate": "2e-4"}, r"training.learning_rate must be a number > 0; got '2e-4'"),
        ({"method": "ppo"}, r"unknown training.method 'ppo'; accepted: causal-lm, e2llm"),
        ({"method": "causal-lm", "g_max": 4}, r"unknown field training.g_max; training accepts: method, model"),
    ],
)
def test_bad_training_fields_name_value_and_accepted(training, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({**E2LLM, "training": training})


def test_e2llm_training_needs_e2llm_positions():
    with pytest.raises(RecipeError, match="training.method e2llm trains.*rope.scaling is linear"):
        Recipe.from_dict({"rope": {"scaling": "linear", "factor": 2}, "training": {"method": "e2llm"}})
    with pytest.raises(LcpatchError, match="not patched with an E2-LLM recipe"):
        start_augmentation(tiny_model(), g_max=2)
    with pytest.raises(RecipeError, match="training.g_max must be an integer >= 1; got 0"):
        E2LLMCallback(g_max=0)
