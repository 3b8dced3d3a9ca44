"""What `lcpatch bench` (cost) and `lcpatch bench decode` record around their cells: the environment, and the
table and figure written next to the results."""

from __future__ import annotations

from pathlib import Path

import torch

from ..cli.common import MISSING, environment, pyplot


def run_environment(device: torch.device, dtype: torch.dtype, model: str, weights: int) -> dict:
    """The results' "environment": where and with what they were measured, the dtype, the model (described)
    and its weights (bytes, recorded in MiB)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return environment(device) | {"dtype": dtype_name, "model": model, "weights_mib": weights / 2**20}


def report(result: dict, results_file: Path, table: str, draw) -> None:
    """Next to the results JSON: the table (.md) and the figure (.png: `draw(result, plt)` returns it, titled
    here with the model, dtype, device and date); both printed."""
    markdown_file, figure = results_file.with_suffix(".md"), results_file.with_suffix(".png")
    markdown_file.write_text(table + "\n")
    env = result["environment"]
    plt = pyplot()
    if plt is not None:
        fig = draw(result, plt)
        fig.suptitle(f"{env['model']}, {env['dtype']}, {env['device']}, {env['date']}")
        fig.tight_layout()
        fig.savefig(figure, dpi=120)
        plt.close(fig)
    print(f"\n{env['model']}, {env['device']}:\n{table}\n")
    print(f"wrote {results_file}, {markdown_file} " + (f"and {figure}" if plt else f"({MISSING})"))
