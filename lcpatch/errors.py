"""Every user-facing error raised by lcpatch; each names the bad value and what is accepted."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class LcpatchError(Exception):
    """Base class of all lcpatch errors."""


class RecipeError(LcpatchError, ValueError):
    """A recipe (name, file, dict or field) is invalid."""


class UnsupportedModelError(LcpatchError, TypeError):
    """The object is not a supported causal LM (family, class or structure)."""


class PatchStateError(LcpatchError, RuntimeError):
    """apply/remove called in the wrong state (already patched, not patched)."""


class UnsupportedVersionError(LcpatchError, ImportError):
    """An installed dependency is outside the supported range."""


class BackendError(LcpatchError, RuntimeError):
    """A requested compute backend cannot run here."""


class SequenceLimitError(LcpatchError, ValueError):
    """An input sequence the patched model cannot take: past a configured limit, empty, or a mask it cannot read."""


class CacheError(LcpatchError, RuntimeError):
    """A KV cache that the patched model cannot use was passed in."""


class RecipeWarning(UserWarning):
    """A recipe that lcpatch runs as written but that is likely not what was meant (the message says why)."""


def run_reporting_errors(job: Callable, args) -> int:
    """Run a command-line job: log to stderr, an lcpatch error as one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        job(args)
    except LcpatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
