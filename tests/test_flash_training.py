"""Dense attention on FlashAttention-4 and padding-free packing, on the CPU: which attention `backend` picks
(the GPU and flash-attn-4 faked where a test needs them), that `remove` switches it back exactly, and that the
trainers' packed rows keep their documents apart (position ids restarting at 0 per sequence)."""

from __future__ import annotations

import pytest
import torch

import lcpatch
from lcpatch import RecipeError
from lcpatch.api import patched_recipe
from lcpatch.attention import Dense, dense
from lcpatch.errors import BackendError
from lcpatch.training.config import CausalLMTraining
from lcpatch.training.e2llm import E2LLMAugmentation
from lcpatch.training.packing import PaddingFreeCollator, packs_padding_free, sequence_lengths

FLASH = {"attention": {"method": "dense", "backend": "flash"}}


def attn(model) -> str:
    return model.config._attn_implementation


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA GPU of the compute capability the test sets (`gpu(9, 0)`), with flash-attn-4 importable."""

    def fake(major: int, minor: int = 0, importable: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        if importable:
            monkeypatch.setattr(dense, "_flash_import_problem", lambda: None)

    return fake


# -- which attention ----------------------------------------------------------------------------------------


def test_auto_keeps_the_models_own_attention_on_the_cpu(make_model, gpu):
    gpu(9)  # flash would run on the GPU, but this model is on the CPU
    for own in ("sdpa", "eager"):
        model = make_model(attn_implementation=own).to(torch.bfloat16)
        lcpatch.apply(model, "dense")
        assert attn(model) == own
        assert patched_recipe(model).attention == Dense(backend="auto")


def test_flash_without_a_gpu_is_an_error_naming_the_fix(make_model):
    model = make_model()
    with pytest.raises(BackendError) as error:
        lcpatch.apply(model, FLASH)
    message = str(error.value)
    assert "attention.backend is 'flash' but no CUDA GPU is available (the model is on cpu)" in message
    assert 'pip install "lcpatch[flash]"' in message and 'attn_implementation="flash_attention_2"' in message
    assert attn(model) == "sdpa" and patched_recipe(model) is None


def test_flash_on_a_gpu_older_than_hopper_is_an_error_naming_its_capability(make_model, gpu):
    gpu(8, 0)
    with pytest.raises(BackendError, match=r"Fake GPU has compute capability 8\.0, and flash-attn-4 runs on Hopper"):
        lcpatch.apply(make_model(), FLASH)


def test_flash_not_installed_is_an_error_naming_the_package(make_model, gpu):
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn-4 is installed here")
    gpu(9, importable=False)
    dense._flash_import_problem.cache_clear()
    with pytest.raises(BackendError, match=r"flash-attn-4 cannot be imported \(from flash_attn.cute: ") as error:
        lcpatch.apply(make_model(), FLASH)
    assert 'pip install "lcpatch[flash]"' in str(error.value)


def test_flash_where_it_runs_sets_flash_attention_4_and_remove_restores_the_own(make_model, gpu):
    gpu(10)
    for own in ("sdpa", "eager"):
        model = make_model(attn_implementation=own)  # on the CPU: a trainer moves it to the GPU
        lcpatch.apply(model, FLASH)
        assert attn(model) == "flash_attention_4" and dense.runs_flash_attention(model)
        lcpatch.remove(model)
        assert attn(model) == own and not dense.runs_flash_attention(model)


def test_flash_on_a_model_transformers_cannot_run_it_for_names_the_other_backends(make_model, gpu, monkeypatch):
    gpu(9)
    model = make_model()
    monkeypatch.setattr(type(model), "_supports_flash_attn", False)
    with pytest.raises(BackendError, match=r"does not support flash attention; use backend: model \(or auto\)\.$"):
        lcpatch.apply(model, FLASH)


def test_auto_decided_for_the_device_a_trainer_moves_the_model_to(make_model, gpu):
    cuda = torch.device("cuda", 0)
    auto = Dense()
    assert auto.for_device(make_model().to(torch.bfloat16), cuda) == Dense(backend="model")  # no GPU here
    gpu(9)
    assert auto.for_device(make_model().to(torch.bfloat16), cuda) == Dense(backend="flash")
    assert auto.for_device(make_model().to(torch.bfloat16), torch.device("cpu")) == Dense(backend="model")
    assert auto.for_device(make_model(), cuda) == Dense(backend="model")  # float32: flash computes in bf16 / fp16
    chosen = make_model(attn_implementation="flex_attention").to(torch.bfloat16)
    assert auto.for_device(chosen, cuda) == Dense(backend="model")  # a choice made when loading is kept
    assert Dense(backend="model").for_device(make_model().to(torch.bfloat16), cuda) == Dense(backend="model")


def test_backend_field_names_the_accepted_values():
    with pytest.raises(RecipeError, match=r"attention.backend must be one of auto, model, flash; got 'triton'"):
        lcpatch.load_recipe({"attention": {"method": "dense", "backend": "triton"}})
    assert lcpatch.load_recipe({"attention": {"method": "dense"}}).attention == Dense(backend="auto")


# -- padding-free packing -----------------------------------------------------------------------------------


def test_sequence_lengths_cut_documents_at_row_ends():
    # documents of 3, 5, 2, 6 tokens laid end to end, rows of 4 tokens
    assert sequence_lengths([3, 5, 2, 6], 4, 4) == [[3, 1], [4], [2, 2], [4]]


def test_padding_free_batch_restarts_positions_and_masks_each_sequences_first_label():
    rows = [
        {"input_ids": torch.arange(10, 16), "sequence_lengths": [2, 4]},
        {"input_ids": torch.arange(20, 26), "sequence_lengths": [6]},
    ]
    batch = PaddingFreeCollator()(rows)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 11, -100, 13, 14, 15, -100, 21, 22, 23, 24, 25]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 6, 12] and batch["max_length_q"] == 6


def test_a_padding_free_batch_attends_within_each_document(make_model):
    """The flattened batch computes what each document computes alone (SDPA here, with the block mask
    transformers derives from restarting position ids; flash attention reads the same batch)."""
    model = make_model()
    documents = [torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 3)]
    batch = PaddingFreeCollator()([{"input_ids": torch.cat(documents), "sequence_lengths": [5, 9, 3]}])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=doc[None], use_cache=False).logits[0] for doc in documents])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


def _trainer(model, tokenizer, tmp_path, trainer: str):
    from lcpatch.training.causal_lm import language_model_trainer

    (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in range(3, 60)))
    (tmp_path / "b.txt").write_text(" ".join(f"w{i}" for i in range(10, 17)))
    training = CausalLMTraining(data=(str(tmp_path / "*.txt"),), sequence_length=16, trainer=trainer)
    settings = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, remove_unused_columns=False)
    return language_model_trainer(training, model, tokenizer, settings)


def _restarts(positions: torch.Tensor) -> int:
    return int((positions[0, 1:] == 0).sum())


@pytest.mark.parametrize("trainer", ["hf", "trl"])
def test_trainers_pack_padding_free_on_flash_and_wrapped_blocks_otherwise(
    make_model, tokenizer, tmp_path, gpu, trainer
):
    model = make_model()
    wrapped = _trainer(model, tokenizer, tmp_path, trainer)
    rows = [wrapped.train_dataset[i] for i in range(2)]
    batch = wrapped.data_collator(rows)
    assert not packs_padding_free(model) and batch["input_ids"].shape == (2, 16)
    assert "position_ids" not in batch or _restarts(batch["position_ids"]) == 0  # one block per row

    gpu(9)
    lcpatch.apply(model, FLASH)
    assert packs_padding_free(model)
    packed = _trainer(model, tokenizer, tmp_path, trainer)
    batch = packed.data_collator([packed.train_dataset[i] for i in range(len(packed.train_dataset))])
    positions = batch["position_ids"]
    assert positions.shape[0] == 1 and _restarts(positions) >= 1  # two documents (of 58 and 8 tokens), 16-token rows
    starts = (positions[0] == 0).nonzero().flatten()
    assert batch["labels"][0, starts].eq(-100).all()
    assert batch["cu_seq_lens_q"].tolist() == [*starts.tolist(), positions.shape[1]]
    if trainer == "hf":  # the documents (57 words + EOS, 7 words + EOS) cut into four 16-token rows
        assert batch["cu_seq_lens_q"].tolist() == [0, 16, 32, 48, 58, 64]


def test_e2llm_draws_one_scale_and_offset_per_packed_sequence():
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    rope = E2LLMAugmentation(g_max=4, training_length=16, sink_tokens=2, seed=3)(positions)[0]
    g, t = E2LLMAugmentation(g_max=4, training_length=16, sink_tokens=2, seed=3).draw(torch.tensor([6, 10]))
    expected = [
        (m + torch.where(m >= 2, shift, 0.0)) / scale
        for m, scale, shift in ((torch.arange(6.0), g[0], t[0]), (torch.arange(10.0), g[1], t[1]))
    ]
    torch.testing.assert_close(rope, torch.cat(expected))
    assert rope.max() < 16  # every sequence stays inside the training length
