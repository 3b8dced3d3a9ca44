"""The support table: which families × attention methods `lcpatch.apply` accepts."""

from __future__ import annotations

from ..models import FAMILIES
from . import ATTENTION_METHODS


class SupportTable(list):
    """Rows of {family, model_types, methods, example}; prints as a Markdown table."""

    def __str__(self) -> str:
        lines = ["| family | model_type | methods | example checkpoint |", "|---|---|---|---|"]
        for row in self:
            cells = (row["family"], ", ".join(row["model_types"]), ", ".join(row["methods"]), row["example"])
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return str(self)


def supported_models() -> SupportTable:
    """Families × methods that `lcpatch.apply` accepts."""
    methods = list(ATTENTION_METHODS)
    return SupportTable(
        {"family": f.name, "model_types": list(f.model_types), "methods": methods, "example": f.example}
        for f in FAMILIES
    )
