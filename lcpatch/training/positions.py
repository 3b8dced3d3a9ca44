"""Position synthesis: read a short real sequence at positions spread over a long virtual range.

LOGO (Tang et al., 2024, arXiv 2410.18533), after PoSE (Zhu et al., 2023), trains long-context
positions with short sequences. A row is

    head (BOS, system prompt) | chunk 0 | chunk 1 | ... | chunk n-1 | tail (question, answer)

and its position ids, inside [0, virtual_length), are:

- the head at 0, 1, ...: every sequence starts where the model saw sequences start in pretraining;
- the tail at the very end of the range, its last token at virtual_length - 1;
- the range between them cut into n equal spans, chunk i a contiguous run inside span i, at
  `offset` (0: the start of the span, 1: its end) of the room its span leaves.

Runs are contiguous and strictly increasing; a jump separates consecutive chunks, so the model sees
distances up to virtual_length while attending over a real sequence of only a few thousand tokens.
One layout per offset: `covering_offsets` gives the offsets whose runs, together, cover every span,
and a collator picks one per use of a row (`lcpatch.training.logo.LOGOCollator`).

The ids are plain integer positions: pass them as `position_ids`, always with an `attention_mask`
(without one, transformers reads the jumps as boundaries of packed sequences and cuts attention at
them). They compose with any RoPE the model has, e.g. rope.scaling e2llm, whose rotary hook divides
them by its g.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import LcpatchError


def _span_width(chunk_lengths: Sequence[int], tail_length: int, virtual_length: int, head_length: int) -> int:
    if not chunk_lengths or min(chunk_lengths) < 1:
        raise LcpatchError(
            f"position synthesis needs at least one chunk, each of >= 1 token; got {list(chunk_lengths)}."
        )
    width = (virtual_length - head_length - tail_length) // len(chunk_lengths)
    if width < max(chunk_lengths):
        raise LcpatchError(
            f"virtual_length {virtual_length} leaves spans of {width} positions for {len(chunk_lengths)} chunks of up "
            f"to {max(chunk_lengths)} tokens (head {head_length}, tail {tail_length}); raise training.virtual_length "
            "or lower training.real_length."
        )
    return width


def synthesize_positions(
    chunk_lengths: Sequence[int],
    tail_length: int,
    virtual_length: int,
    offset: float,
    head_length: int = 0,
) -> torch.Tensor:
    """Position ids (int64, length head + sum(chunks) + tail) of one row laid out over [0, virtual_length).

    Chunk i starts at head_length + i·W + round(offset·(W − len_i)), W = (virtual_length − head − tail) // n.
    """
    if not 0.0 <= offset <= 1.0:
        raise LcpatchError(f"position synthesis offset must be in [0, 1]; got {offset}.")
    width = _span_width(chunk_lengths, tail_length, virtual_length, head_length)
    runs = [torch.arange(head_length)]
    for i, length in enumerate(chunk_lengths):
        start = head_length + i * width + round(offset * (width - length))
        runs.append(torch.arange(start, start + length))
    runs.append(torch.arange(virtual_length - tail_length, virtual_length))
    return torch.cat(runs)


def covering_offsets(
    chunk_lengths: Sequence[int], tail_length: int, virtual_length: int, head_length: int = 0, count: int | None = None
) -> list[float]:
    """`count` offsets evenly spaced on [0, 1]; by default the fewest, ceil(W / longest chunk), whose runs
    of the longest chunk tile its span (a shorter last chunk covers its span less)."""
    if count is None:
        width = _span_width(chunk_lengths, tail_length, virtual_length, head_length)
        count = math.ceil(width / max(chunk_lengths))
    if count == 1:
        return [0.0]
    return [k / (count - 1) for k in range(count)]
