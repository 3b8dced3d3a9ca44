"""Long documents for training and data building: local text files, folders, globs or a datasets name."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from ..errors import RecipeError

logger = logging.getLogger(__name__)

FILE_SUFFIXES = {".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".parquet", ".gz"}


def _looks_like_a_path(entry: str) -> bool:
    return (
        Path(entry).suffix.lower() in FILE_SUFFIXES
        or entry.startswith(("/", "./", "../", "~"))
        or any(c in entry for c in "*?[")
    )


def local_files(entry: str, source: str = "training.data") -> list[Path] | None:
    """The text files an entry names (a file, a folder of .txt files, a glob), or None for a datasets name.
    A path that matches nothing is an error here, so that a typo is never sent to the Hub."""
    path = Path(entry).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [Path(p) for p in sorted(glob.glob(str(path)))]
    if files:
        return files
    if path.exists():
        raise RecipeError(f"{source} entry {entry!r} is a folder without .txt files.")
    if _looks_like_a_path(entry):
        raise RecipeError(
            f"{source} entry {entry!r} is not a file, folder or glob match here; check the path "
            "(a datasets name has no file extension or leading ./, ../, / or ~)."
        )
    return None


def load_texts(
    data: tuple[str, ...], dataset_config: str | None = None, text_field: str = "text", source: str = "training.data"
) -> list[str]:
    """The documents of `data`: one per local text file, or the rows of a datasets dataset (its train split).
    `source` names the setting in error messages (training.data, --text, ...)."""
    if not data:
        raise RecipeError(f"{source} is empty; give text files, folders of .txt files, globs or a datasets name.")
    texts = []
    for entry in data:
        files = local_files(entry, source)
        if files is not None:
            texts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
            continue
        from datasets import load_dataset  # only here: local files need no `datasets` (the GPU machine lacks it)

        logger.info("%s %r is no local file: loading it with datasets.load_dataset", source, entry)
        rows = load_dataset(entry, dataset_config, split="train")
        if text_field not in rows.column_names:
            raise RecipeError(
                f"dataset {entry!r} ({source}) has no column {text_field!r}; "
                f"its columns: {', '.join(rows.column_names)}."
            )
        texts += rows[text_field]
    return texts
