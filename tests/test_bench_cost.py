"""`lcpatch bench` (cost against context length): end to end on a tiny model, presets, argument errors."""

from __future__ import annotations

import json

import pytest
import torch

from lcpatch.bench import cost as bench_cost
from lcpatch.bench import presets
from lcpatch.bench.timing import Clock
from lcpatch.cli import main

from tiny_models import VOCAB, tiny_model


def _bench(*argv: str) -> int:
    return main(["bench", *argv, "--device", "cpu", "--no-progress"])


def test_cost_end_to_end(tiny_model_dir, tmp_path, capsys):
    argv = ("--model", str(tiny_model_dir), "--recipes", "vanilla,lm-infinite", "--lengths", "48,96")
    assert _bench(*argv, "--batch", "1,2", "--new-tokens", "3", "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "cost.json").read_text())
    assert result["schema"] == 1 and result["args"]["lengths"] == [48, 96]
    env = result["environment"]
    assert env["dtype"] == "float32" and env["weights_mib"] > 0 and env["torch"] == torch.__version__
    cells = {(c["recipe"], c["batch"], c["length"]) for c in result["runs"]}
    assert cells == {(r, b, n) for r in ("vanilla", "lm-infinite") for b in (1, 2) for n in (48, 96)}
    for cell in result["runs"]:
        assert cell["prefill_s"] > 0 and cell["decode_tokens_per_s"] > 0 and cell["peak_memory_mib"] >= 0
        assert cell["decode_tokens_per_s_all"] == pytest.approx(cell["decode_tokens_per_s"] * cell["batch"])
    assert (tmp_path / "cost.png").stat().st_size > 1000
    table = (tmp_path / "cost.md").read_text()
    assert "| lm-infinite | 2 |" in table and table in capsys.readouterr().out + "\n"


def test_clock_counts_one_time_per_generated_token():
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (2, 20))
    cell = bench_cost.measure(model, "vanilla", ids, new_tokens=5)
    clock = Clock(ids.device)
    clock.start()
    model.generate(ids, max_new_tokens=6, min_new_tokens=6, logits_processor=[clock], do_sample=False, pad_token_id=0)
    times = clock.seconds()
    assert len(times) == 6 and times == sorted(times) and times[0] > 0
    assert cell["decode_tokens_per_s"] > 0


def test_out_of_memory_is_recorded_and_longer_lengths_skipped(tiny_model_dir, tmp_path, monkeypatch):
    real = bench_cost.measure

    def measure(model, recipe, ids, new_tokens):
        if ids.shape[1] >= 96:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return real(model, recipe, ids, new_tokens)

    monkeypatch.setattr(bench_cost, "measure", measure)
    argv = ("--model", str(tiny_model_dir), "--recipes", "vanilla", "--lengths", "32,96,128", "--new-tokens", "2")
    assert _bench(*argv, "--out", str(tmp_path)) == 0
    runs = json.loads((tmp_path / "cost.json").read_text())["runs"]
    assert "prefill_s" in runs[0] and runs[1]["error"] == "out of memory" and "skipped" in runs[2]
    assert (
        "| vanilla | 1 |" in (tmp_path / "cost.md").read_text()
        and "OOM | skipped" in (tmp_path / "cost.md").read_text()
    )


def test_presets_are_the_public_shapes():
    from transformers import AutoConfig

    settings = dict(presets.PRESETS["llama3-8b"])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    head_dim = config.hidden_size // config.num_attention_heads
    assert (config.num_hidden_layers, config.num_key_value_heads, head_dim) == (32, 8, 128)
    model, described, weights = presets.load_model("smollm2-135m", 1, torch.device("cpu"), torch.float32)
    assert model.config.num_hidden_layers == 1 and "first 1 layers" in described
    assert weights == sum(p.numel() for p in model.parameters()) * 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--model", "no-such-model"), "neither a preset"),
        (("--model", "smollm2-135m", "--layers", "99"), "--layers 99"),
        (("--model", "smollm2-135m", "--batch", "0"), "--batch"),
        (("--model", "smollm2-135m", "--lengths", "4q"), "--lengths"),
        (("--model", "smollm2-135m", "--recipes", "no-such-recipe"), "no-such-recipe"),
        (("--model", "smollm2-135m", "--new-tokens", "0"), "--new-tokens"),
    ],
)
def test_bad_arguments_name_the_value(argv, message, tmp_path, capsys):
    assert _bench(*argv, "--out", str(tmp_path)) == 2
    assert message in capsys.readouterr().err


def test_layers_refused_for_a_model_with_weights(tiny_model_dir, tmp_path, capsys):
    assert _bench("--model", str(tiny_model_dir), "--layers", "1", "--out", str(tmp_path)) == 2
    assert "random-weight models only" in capsys.readouterr().err


def test_decode_bench_end_to_end(tmp_path):
    """`lcpatch bench decode --tiny`: every method at every cell (hf-compile skipped on a CPU, saying why)."""
    assert main(["bench", "decode", "--tiny", "--lengths", "64,256", "--batch", "1,2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "decode.json").read_text())
    assert result["args"]["compile_cells"] == []  # --tiny's default; the GPU default is "all"
    cells = {(c["method"], c["batch"], c["length"]): c for c in result["runs"]}
    assert len(cells) == 4 * 2 * 2
    for (method, _, _), cell in cells.items():
        if method == "hf-compile":
            assert "CUDA" in cell["skipped"]
        else:
            assert cell["decode_tokens_per_s"] > 0 and "limit_ratio" not in cell  # no bandwidth limit on a CPU
    assert "| 2 | 256 |" in (tmp_path / "decode.md").read_text()


@pytest.mark.parametrize(("spec", "expected"), [("all", None), ("4k:1, 32k:8", {(4096, 1), (32768, 8)})])
def test_decode_bench_compile_cells(spec, expected):
    from lcpatch.bench.decode import _cells

    assert _cells(spec) == expected


def test_decode_bench_refuses_a_bad_compile_cell(tmp_path, capsys):
    assert main(["bench", "decode", "--tiny", "--compile-cells", "4k", "--out", str(tmp_path)]) != 0
    assert "--compile-cells: '4k' is not LENGTH:BATCH" in capsys.readouterr().err
