"""The argument vocabulary the commands share, importable without torch: a command's --help must not load it."""

from __future__ import annotations

VANILLA = "vanilla"  # a --recipes column that is the unpatched model
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # --dtype values besides auto
