"""Padding-free packing: where a trainer packs documents into rows and the model attends with flash
attention, each row keeps its documents apart. Position ids restart at 0 for every packed sequence,
the batch is flattened into one row, and transformers' flash path attends within each sequence only
(from the `cu_seq_lens_*` boundaries passed with the batch, so no layer derives them from the
position ids). The first token of every sequence gets no label: nothing before it predicts it.

On SDPA or eager attention the same isolation would need a materialised block-diagonal mask (memory
quadratic in the row, and none of SDPA's fast kernels), so there the rows stay 'wrapped': equal blocks
of the token stream, attending across document boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import DataCollatorWithFlattening

from ..attention.dense import runs_flash_attention
from . import sequence_parallel


def packs_padding_free(model) -> bool:
    """Whether a trainer packs this model's rows padding-free: it attends with flash attention, and no sequence
    parallelism cuts its rows (its shards are equal slices of a row, cut across the packed sequences)."""
    return runs_flash_attention(model) and sequence_parallel.configured_size() == 1


def sequence_lengths(document_lengths: Sequence[int], row_length: int, rows: int) -> list[list[int]]:
    """For the first `rows` rows of `row_length` tokens cut from the documents laid end to end: the lengths of the
    sequences each row holds. A document cut by a row's end continues as the next row's first sequence."""
    ends = np.cumsum(document_lengths)
    lengths = []
    for start in range(0, rows * row_length, row_length):
        stop = start + row_length
        inside = ends[np.searchsorted(ends, start, side="right") : np.searchsorted(ends, stop, side="left")]
        lengths.append(np.diff([start, *inside.tolist(), stop]).tolist())
    return lengths


class PaddingFreeCollator:
    """Rows of packed sequences ({"input_ids": (L,), "sequence_lengths": [...]}) -> one flattened row: input_ids,
    position_ids restarting at 0 per sequence, labels (-100 at each sequence's first token) and flash attention's
    cu_seq_lens_q/k and max_length_q/k (transformers' `DataCollatorWithFlattening`)."""

    def __init__(self):
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    def __call__(self, rows: list[dict]) -> dict:
        sequences = [
            {"input_ids": piece}
            for row in rows
            for piece in torch.split(torch.as_tensor(row["input_ids"]), list(row["sequence_lengths"]))
        ]
        return self.flatten(sequences)
