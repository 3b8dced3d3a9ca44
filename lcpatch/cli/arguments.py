"""What the commands' arguments share, importable without torch (a command's --help must not load it): names,
and the docstring of a module read without importing it."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

VANILLA = "vanilla"  # a --recipes column that is the unpatched model
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # --dtype values besides auto


def module_doc(name: str) -> str:
    """The docstring of module `name`, read from its source: importing the module may load torch."""
    source = Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source)) or ""
