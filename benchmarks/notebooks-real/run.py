"""Runs notebooks top to bottom in real mode (LCPATCH_NOTEBOOK_SIZE=real) and stores each with its outputs, the
first cell's "Stored outputs" paragraph rewritten to say where, when and how long it ran. CI runs the same
notebooks in tiny mode (tests/test_notebooks.py), and checks the stored outputs.

On the GPU machine (the model comes from LCPATCH_SMOLLM2_GGUF; the books from ../shared/data/gutenberg, next to
the repository, as on the CPU machine):
    LCPATCH_SMOLLM2_GGUF=/tmp/lcm/model.gguf python3 benchmarks/notebooks-real/run.py --out $OUT/notebooks \\
        notebooks/02_infllm_retrieval.ipynb notebooks/03_e2llm_lora.ipynb notebooks/04_preference_training.ipynb
Each executed notebook is written to --out under its own name, with timings in --out/runs.json.

Time (H100 shared with the three SmolLM2 benchmarks, 2026-12-07): 02 17.1 min, 03 1.5 min, 04 5.7 min.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import time
from pathlib import Path

import nbclient
import nbformat
import torch
import transformers

STORED = re.compile(r"\*\*Stored outputs: `(tiny|real)` mode\*\*.*?(?=\n\n|\Z)", re.S)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"a {os.cpu_count()}-core CPU"


def run(path: Path, out: Path, timeout: int) -> dict:
    nb = nbformat.read(path, as_version=4)
    os.environ["LCPATCH_NOTEBOOK_SIZE"] = "real"
    began = time.perf_counter()
    nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    seconds = time.perf_counter() - began
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    stored = (
        f"**Stored outputs: `real` mode**, run on {device_name()} ({datetime.date.today().isoformat()}, {versions}): "
        f"{seconds / 60:.1f} minutes for the whole notebook (`benchmarks/notebooks-real/run.py`)."
    )
    first = nb.cells[0]
    if not STORED.search(first.source):
        raise SystemExit(f"{path.name}: its first cell has no '**Stored outputs: `...` mode**' paragraph to update")
    first.source = STORED.sub(stored, first.source, count=1)
    nbformat.write(nb, out / path.name)
    return {"notebook": path.name, "seconds": round(seconds), "device": device_name(), "versions": versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="folder for the executed notebooks and runs.json")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a cell may run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for path in args.notebooks:
        runs.append(run(path.resolve(), args.out, args.timeout))
        print(runs[-1], flush=True)
    (args.out / "runs.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
