"""Figures are optional: matplotlib comes with the ``eval`` extra, and a run without it still writes its JSON
and table, then says which figure it skipped and how to get it."""

from __future__ import annotations

MISSING = "matplotlib is not installed, so no figure was drawn (pip install 'lcpatch[eval]' to get one)"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
