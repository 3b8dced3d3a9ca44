"""The notebooks in notebooks/ run: each is executed top to bottom in tiny mode (LCPATCH_NOTEBOOK_SIZE=tiny,
CPU, the tiny model of tests/fixtures) and its printed results are checked; the stored copies carry the
outputs of one complete run, in the mode their first cell says."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import nbclient  # with ipykernel: the dev extra
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# A hang guard per cell, not a speed check (speed lives in benchmarks): the four take ~2-4 minutes together
# in tiny mode on a 2-core CPU.
CELL_TIMEOUT_S = 900
NUMBER = r"([0-9][0-9,]*\.?[0-9]*|inf|nan)"


def number(text: str) -> float:
    return float(text.replace(",", ""))


def outputs(nb) -> tuple[str, list[str]]:
    """All printed text (streams and plain-text results) and the MIME types of every output, in order."""
    text, kinds = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                text.append(out["text"])
                kinds.append("stream")
            elif out["output_type"] in ("display_data", "execute_result"):
                text.append(out["data"].get("text/plain", ""))
                kinds.extend(out["data"])
            else:
                kinds.append(out["output_type"])
    return "\n".join(text), kinds


def find(pattern: str, text: str) -> re.Match:
    match = re.search(pattern, text)
    assert match, f"no output matches {pattern!r}"
    return match


def check_quickstart(text: str) -> None:
    match = find(rf"past the training length: vanilla {NUMBER}, lm-infinite {NUMBER}", text)
    vanilla, patched = number(match.group(1)), number(match.group(2))
    assert math.isfinite(patched) and patched < vanilla
    assert "logits identical to the unpatched model's: True" in text


def check_retrieval(text: str) -> None:
    for method in ("lm-infinite", "infllm"):
        assert 0.0 <= number(find(rf"{method}: accuracy beyond the training length {NUMBER}", text).group(1)) <= 1.0
    assert "patched with 'infllm'" in text


def check_e2llm(text: str) -> None:
    match = find(rf"windows of {NUMBER} tokens: base with plain positions {NUMBER}, E2-LLM LoRA {NUMBER}", text)
    trained_at = number(find(r"trained at (\d+) tokens", text).group(1))
    assert number(match.group(1)) > trained_at
    plain, e2llm = number(match.group(2)), number(match.group(3))
    assert math.isfinite(e2llm) and e2llm < plain
    assert find(r"training loss by step: \{", text)


def check_preference(text: str) -> None:
    assert int(find(r"num_rows: (\d+)", text).group(1)) > 0  # LongPO pairs
    assert int(find(r"(\d+) rows; context of row 0", text).group(1)) > 0  # LOGO rows
    for method, recipe in (("LongPO", "longpo"), ("LOGO", "logo")):
        match = find(rf"{method}: (\d+) steps, final loss {NUMBER}; reloaded as .* patched with '{recipe}'", text)
        assert int(match.group(1)) > 0 and math.isfinite(number(match.group(2)))


CHECKS = {
    "01_quickstart.ipynb": check_quickstart,
    "02_infllm_retrieval.ipynb": check_retrieval,
    "03_e2llm_lora.ipynb": check_e2llm,
    "04_preference_training.ipynb": check_preference,
}


def test_every_notebook_is_checked():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_in_tiny_mode(name, monkeypatch):
    monkeypatch.setenv("LCPATCH_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # tiny mode is the CPU run, as in CI
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    began = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    seconds = time.perf_counter() - began
    text, kinds = outputs(nb)
    print(f"{name}: {seconds:.0f} s in tiny mode")
    assert "size tiny, device cpu" in text
    assert "image/png" in kinds, "the notebook drew no figure"
    CHECKS[name](text)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_stored_notebook_carries_a_complete_run(name):
    """Readers see outputs: every code cell ran, in order, without errors, figures included, in the mode that
    the first cell announces."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "not one top-to-bottom run"
    text, kinds = outputs(nb)
    assert "error" not in kinds
    assert "image/png" in kinds
    announced = find(r"\*\*Stored outputs: `(tiny|real)` mode\*\*", nb.cells[0].source).group(1)
    assert f"size {announced}," in text, f"the first markdown cell says {announced} mode; the outputs are not"
    CHECKS[name](text)
