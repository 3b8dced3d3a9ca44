"""What the commands share: their common arguments (recipe lists, lengths, batch sizes, device, dtype), the
perplexity table, the optional matplotlib, and the environment a result was measured in."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path

import torch
import transformers

from .. import __version__
from ..errors import LcpatchError, RecipeError
from ..recipe import load_recipe
from .arguments import DTYPE_NAMES, VANILLA

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
MISSING = "matplotlib is not installed, so no figure was drawn (pip install 'lcpatch[eval]' to get one)"


# --- arguments --------------------------------------------------------------------------------------------


def parse_recipes(spec: str) -> list[str]:
    """The columns named by --recipes, each checked now so that a typo fails before the model loads."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise LcpatchError(f"--recipes is empty; give e.g. '{VANILLA},lm-infinite'.")
    for name in names:
        if name == VANILLA:
            continue
        try:
            load_recipe(name)
        except RecipeError as exc:
            raise RecipeError(f"--recipes: {exc} It also accepts '{VANILLA}' (the unpatched model).") from exc
    if len(set(names)) != len(names):
        raise LcpatchError(f"--recipes names a column twice: {spec!r}.")
    return names


def parse_lengths(spec: str) -> list[int]:
    """'1k,2k,512' -> [1024, 2048, 512]; k = 1024, m = 1024²; each a positive integer."""
    lengths = []
    for part in (p.strip() for p in spec.split(",")):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", part)
        value = float(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()] if match else 0
        if not match or value < 1 or value != int(value):
            raise LcpatchError(f"--lengths: {part!r} is not a length; give e.g. '1k,2k,4096' (k = 1024 tokens).")
        lengths.append(int(value))
    if len(set(lengths)) != len(lengths):
        raise LcpatchError(f"--lengths names a length twice: {spec!r}.")
    return lengths


def parse_numbers(flag: str, spec: str) -> tuple[float, ...]:
    """'8,1,1.5' -> (8.0, 1.0, 1.5): a comma-separated list of numbers given to `flag`."""
    try:
        return tuple(float(part) for part in spec.split(","))
    except ValueError:
        raise LcpatchError(f"{flag}: {spec!r} is not a comma-separated list of numbers; give e.g. '8,1,1,1'.") from None


def length_label(n: int) -> str:
    """A length as parse_lengths reads it: 4096 -> '4k', 2**20 -> '1M'."""
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def parse_batches(spec: str) -> list[int]:
    try:
        batches = [int(part) for part in spec.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or len(set(batches)) != len(batches):
        raise LcpatchError(f"--batch: {spec!r} is not a list of distinct positive batch sizes; give e.g. '1,8'.")
    return batches


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise LcpatchError(f"--device {device!r} is not a device; accepted: auto, cpu, cuda, cuda:N.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LcpatchError(f"--device {device!r} asks for CUDA, but torch sees no CUDA device here; use cpu or auto.")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


# --- results ----------------------------------------------------------------------------------------------


def _label(start: int, end: int) -> str:
    def k(n: int) -> str:
        return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)

    return f"{k(start)}–{k(end)}"


def format_table(results: dict[str, dict], seconds: dict[str, float] | None = None) -> str:
    """A Markdown table: one row per position bucket, one perplexity column per recipe; with `seconds`, a last
    row of each column's wall time."""
    names = list(results)
    first = results[names[0]]
    lines = ["| tokens | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i, bucket in enumerate(first["buckets"]):
        cells = [f"{results[name]['buckets'][i]['ppl']:,.1f}" for name in names]
        lines.append(f"| {_label(bucket['start'], bucket['end'])} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(f"{results[name]['overall']['ppl']:,.1f}" for name in names) + " |")
    if seconds is not None:
        lines.append("| wall time | " + " | ".join(f"{seconds[name]:,.1f} s" for name in names) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib (the ``eval`` extra) is not
    installed: a run without it still writes its JSON and table, then says which figure it skipped (MISSING)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def environment(device: torch.device | str | None = None) -> dict:
    """Where and with what a result was measured: the date, the device (default: the one torch would pick),
    the versions of python, torch, transformers, triton and flash-attn-4 (None when absent) and lcpatch, and the
    git commit of lcpatch's checkout (None when lcpatch does not run from one)."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or device.type}, {torch.get_num_threads()} threads"
    return {
        "date": datetime.date.today().isoformat(),
        "device": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": _triton_version(),
        "flash_attn_4": _distribution_version("flash-attn-4"),
        "lcpatch": __version__,
        "commit": _git_commit(),
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    # Only lcpatch's own checkout: an installed copy may sit inside some other repository.
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        found = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip()
