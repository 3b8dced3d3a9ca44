"""Multi-process training on CPU (gloo): the shipped Accelerate configs parse with accelerate's own loader;
`accelerate launch --config_file recipes/accelerate/ddp.yaml` trains LongPO and LOGO on 2 processes; and on
2 processes the sequence-parallel (SP) losses of E2-LLM, LongPO and LOGO — each row cut in two shards, attention
through lcpatch's Ulysses all-to-all — equal the one-process losses on the same batch (and LOGO's gradients)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from test_logo import logo_rows, logo_trainer
from test_longpo import pair_rows, trainer_for

import lcpatch
from lcpatch.errors import LcpatchError
from lcpatch.training import e2llm, sequence_parallel
from lcpatch.training.logo import LOGOCollator
from lcpatch.training.runner import ACCELERATE_CONFIGS, accelerate_config

from tiny_models import random_ids, tiny_model, tiny_tokenizer

SP_SIZE = 2
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


# -- the shipped configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_shipped_configs_parse_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = accelerate_config(name)
    config = load_config_from_file(str(path))
    assert path.parent.name == "accelerate" and path.parent.parent.name == "recipes"
    assert config.num_processes == 2 and config.mixed_precision == "no"
    expected = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED", "zero3-ulysses": "DEEPSPEED"}[name]
    assert config.distributed_type == DistributedType[expected]
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if name.startswith("zero3"):
        assert config.deepspeed_config["zero_stage"] == 3
    if name == "zero3-ulysses":
        from accelerate.parallelism_config import ParallelismConfig

        sizes = {k.removeprefix("parallelism_config_"): v for k, v in config.parallelism_config.items()}
        assert sizes["sp_size"] * sizes["dp_replicate_size"] * sizes["dp_shard_size"] == config.num_processes
        # The same fields accelerate's ParallelismConfig is built from (it reads them from the environment).
        keys = ("dp_replicate_size", "dp_shard_size", "sp_size", "sp_backend")
        assert ParallelismConfig(**{key: sizes[key] for key in keys}).sp_enabled


def test_configs_ship_inside_the_package():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "accelerate/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["lcpatch.recipes"]
    assert sorted(p.stem for p in accelerate_config("ddp").parent.glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


def test_cli_prints_a_config_path_and_refuses_unknown_names(capsys):
    from lcpatch.cli.train import main

    assert main(["--accelerate-config", "fsdp2"]) == 0
    assert capsys.readouterr().out.strip() == str(accelerate_config("fsdp2"))
    with pytest.raises(lcpatch.RecipeError, match="unknown Accelerate config 'zero2'; shipped: ddp, fsdp2"):
        accelerate_config("zero2")


def test_sharding_keeps_positions_global_and_shifts_labels_before_cutting():
    ids = torch.arange(10, 15)[None]  # 5 tokens: padded to 6, 3 per shard
    positions = torch.tensor([[0, 1, 40, 41, 99]])  # LOGO-style jumps
    labels = torch.tensor([[-100, -100, 12, 13, 14]])
    shards = [
        sequence_parallel.shard_batch(
            {"input_ids": ids, "position_ids": positions, "labels": labels},
            sequence_parallel.SequenceParallel(None, r, 2),
        )
        for r in range(2)
    ]
    assert [s["position_ids"].tolist() for s in shards] == [[[0, 1, 40]], [[41, 99, 0]]]
    assert [s["shift_labels"].tolist() for s in shards] == [[[-100, 12, 13]], [[14, -100, -100]]]  # 40 predicts 13
    assert [s["attention_mask"].tolist() for s in shards] == [[[1, 1, 1]], [[1, 1, 0]]]
    with pytest.raises(LcpatchError, match="right-padded rows"):
        sequence_parallel.shard_batch(
            {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1, 1]])},
            sequence_parallel.SequenceParallel(None, 0, 2),
        )


def test_under_deepspeed_ulysses_batches_fit_its_loader_and_longpo_refuses(tmp_path, monkeypatch):
    """accelerate launch exports the parallelism config; DeepSpeed's loader needs position_ids and rows it can
    cut evenly, and the E2-LLM draw is shared by the SP group (seeded per data-parallel rank)."""
    from lcpatch.training.causal_lm import _next_token_batch

    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")
    assert sequence_parallel.uses_deepspeed() and sequence_parallel.configured_size() == 2
    batch = _next_token_batch([{"input_ids": torch.arange(6)}, {"input_ids": torch.arange(6, 12)}])
    assert batch["position_ids"].tolist() == [list(range(6))] * 2
    logo = logo_trainer(tmp_path, tiny_model(), logo_rows(2))
    assert LOGOCollator(0, 256)([logo.train_dataset[0], logo.train_dataset[1]])["input_ids"].shape[1] % 2 == 0
    model = tiny_model(max_position_embeddings=32)
    lcpatch.apply(model, {"rope": {"scaling": "e2llm"}})
    draws = []
    for rank in range(3):  # SP groups {0, 1}, {2, 3}
        args = type("Args", (), {"seed": 5, "process_index": rank})
        e2llm.E2LLMCallback(g_max=8).on_train_begin(args, None, None, model=model)
        draws.append(torch.cat(lcpatch.rope.e2llm.e2llm_positions_of(model).augmentation.draw(torch.full((16,), 8))))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    with pytest.raises(lcpatch.RecipeError, match="LongPO does not run under DeepSpeed's Ulysses data loader"):
        trainer_for(tmp_path, tiny_model(), pair_rows(2), lora=None)


def test_sequence_parallelism_refuses_lambda_attention():
    model = tiny_model()
    with lcpatch.patched(model, "lm-infinite"):
        with pytest.raises(LcpatchError, match="attention.method lm-infinite cannot train under sequence parallelism"):
            sequence_parallel.check_attention(model)


# -- sharded loss == unsharded loss (2 processes, gloo) -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _e2llm_loss(model, batch, sp) -> torch.Tensor:
    """Mean next-token CE of the rows (E2-LLM's loss), from per-shard sums reduced over the SP group."""
    e2llm.start_augmentation(model, g_max=4, seed=7)  # the same draw for both runs, on every rank
    if sp is not None:
        batch = sequence_parallel.shard_batch(batch, sp)
    targets = batch.pop("shift_labels")
    logits = model(**batch, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return sequence_parallel.reduce_sum(loss, sp) / sequence_parallel.reduce_sum((targets != -100).sum(), sp)


def _check_each_loss(rank: int, tmp_path) -> None:
    """One SP rank: the three losses on one batch, unsharded and then with SP over both processes."""
    torch.manual_seed(0)
    full = sequence_parallel.SequenceParallel(None, 0, 1)  # one shard: the unsharded baseline

    # E2-LLM: positions (m + t) / g drawn from the row's whole length, on every shard.
    model = tiny_model(max_position_embeddings=32).train()
    lcpatch.apply(model, {"rope": {"scaling": "e2llm"}})
    ids = random_ids(23, batch=2)  # odd: the last shard is padded
    batch = {"input_ids": ids, "labels": ids}
    baseline = _e2llm_loss(model, sequence_parallel.shard_batch(batch, full), None)
    sp = sequence_parallel.enable(model, dist.group.WORLD)
    torch.testing.assert_close(_e2llm_loss(model, dict(batch), sp), baseline, **TOLERANCE)
    sequence_parallel.disable(model)

    # LongPO: TRL's DPO + NLL over the long prompt, the reference (LoRA off) over the short one.
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer = trainer_for(tmp_path / f"longpo{rank}", model, pair_rows(4), lora=None, beta=0.5, dpo_weight=0.5)
    pairs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        baseline = trainer.compute_loss(model, pairs)
        sequence_parallel.enable(model, dist.group.WORLD)
        torch.testing.assert_close(trainer.compute_loss(model, pairs), baseline, **TOLERANCE)
    sequence_parallel.disable(model)

    # LOGO: SimPO on mean log-probs at synthesised positions (jumps), gradients too.
    model = tiny_model().train()
    trainer = logo_trainer(tmp_path / f"logo{rank}", model, logo_rows(2), beta=2.5, sft_weight=0.7)
    rows = LOGOCollator(0, 256, seed=0)([trainer.train_dataset[0], trainer.train_dataset[1]])
    trainer.compute_loss(model, rows).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    baseline = trainer.compute_loss(model, rows).detach()
    model.zero_grad()
    sequence_parallel.enable(model, dist.group.WORLD)
    loss = trainer.compute_loss(model, rows)
    loss.backward()
    torch.testing.assert_close(loss.detach(), baseline, **TOLERANCE)
    for grad, param in zip(grads, model.parameters(), strict=True):
        dist.all_reduce(param.grad)  # what data-parallel averaging does over the whole world (here: the SP group)
        torch.testing.assert_close(param.grad / SP_SIZE, grad, **TOLERANCE)
    sequence_parallel.disable(model)


def _worker(rank: int, port: int, tmp_path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    # A rank that skips a collective must fail the test in minutes, not after gloo's default half hour.
    dist.init_process_group("gloo", rank=rank, world_size=SP_SIZE, timeout=timedelta(seconds=120))
    try:
        _check_each_loss(rank, tmp_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_sequence_parallel_losses_equal_the_unsharded_ones(tmp_path):
    mp.spawn(_worker, args=(_free_port(), tmp_path), nprocs=SP_SIZE, join=True)


# -- accelerate launch --config_file recipes/accelerate/ddp.yaml: 2 processes, each trainer ------------------


def _launch(tmp_path, recipe: str, data, **flags) -> dict:
    """`accelerate launch --config_file ddp.yaml -m lcpatch.cli.train` on 2 CPU processes; the trainer state."""
    folder = tmp_path / "model"
    tiny_model(tie_word_embeddings=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    fields = {"model": folder, "data": data, "max-steps": 2, "batch-size": 2, "logging-steps": 1, "output-dir": out}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config("ddp"))]
    command += ["-m", "lcpatch.cli.train", recipe]
    for name, value in {**fields, **flags}.items():
        command += [f"--{name}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # cwd outside the repository: its top-level kernels/ folder would shadow the `kernels` package transformers probes.
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes (gloo)" in result.stderr
    return json.loads((out / "trainer_state.json").read_text())


@pytest.mark.distributed
def test_accelerate_launch_ddp_config_trains_longpo(tmp_path):
    data = tmp_path / "pairs"
    Dataset.from_list(pair_rows(8)).save_to_disk(str(data))
    state = _launch(tmp_path, "longpo", data)
    assert state["global_step"] == 2
    assert all("rewards/margins" in entry for entry in state["log_history"] if "loss" in entry)


@pytest.mark.distributed
def test_accelerate_launch_ddp_config_trains_logo(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in logo_rows(8)))
    state = _launch(tmp_path, "logo", data, **{"chunk-size": 16, "virtual-length": 512, "warmup-steps": 0})
    assert state["global_step"] == 2
    assert all("nll_loss" in entry for entry in state["log_history"] if "loss" in entry)
