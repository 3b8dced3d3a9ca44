"""Long documents for training and data building: local text files, folders, globs or a datasets name."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from ..errors import RecipeError

logger = logging.getLogger(__name__)


def load_texts(data: tuple[str, ...], dataset_config: str | None = None, text_field: str = "text") -> list[str]:
    """The documents of `data`: one per local text file, or the rows of a datasets dataset."""
    if not data:
        raise RecipeError("training.data is empty; give text files, folders of .txt files, globs or a datasets name.")
    texts = []
    for entry in data:
        path = Path(entry).expanduser()
        files = sorted(path.glob("*.txt")) if path.is_dir() else [Path(p) for p in sorted(glob.glob(str(path)))]
        if files:
            texts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
            continue
        if path.exists():
            raise RecipeError(f"training.data entry {entry!r} is a folder without .txt files.")
        from datasets import load_dataset  # only here: local files need no `datasets` (the GPU machine lacks it)

        logger.info("training.data %r is no local file: loading it with datasets.load_dataset", entry)
        rows = load_dataset(entry, dataset_config, split="train")
        if text_field not in rows.column_names:
            raise RecipeError(
                f"dataset {entry!r} has no column {text_field!r} (training.text_field); "
                f"its columns: {', '.join(rows.column_names)}."
            )
        texts += rows[text_field]
    return texts
