"""E2-LLM's training-side augmentation (Liu et al., 2024, arXiv 2401.06951).

Each training sequence sees RoPE at positions (m + t) / g: the scale g drawn from {1, ..., g_max}
(uniformly, or with relative `g_weights`), the offset t uniformly from the integers in [0, g·L - R]
(L: the model's training length, R: the sequence's length), the first `sink_tokens` tokens keeping
t = 0 (attention sinks).
So every RoPE position stays below L, while the model learns many position densities at once.
A row packed padding-free (position ids restarting at 0 per sequence, `lcpatch.training.packing`)
holds several sequences: each draws its own (g, t) from its own length.

The model itself keeps its integer position_ids: transformers' mask code reads them (e.g. to find
sequences packed by TRL's padding-free collator), so the transform is applied where RoPE is
computed, by the rotary hook that `lcpatch.apply` installs for `rope: {scaling: e2llm}`. Turn it
on for a Trainer / TRL SFTTrainer (PEFT models included) with `E2LLMCallback`, or in your own loop
with `start_augmentation` / `stop_augmentation`. It acts only while the model is in training mode.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..errors import LcpatchError
from ..fields import check_int
from ..rope.e2llm import e2llm_positions_of
from . import sequence_parallel
from .config import check_g_weights


def e2llm_positions(positions: torch.Tensor, g: torch.Tensor, t: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """RoPE positions (m + t) / g (fp32) of integer positions m (B, L), with g and t per row (B,) or per token (B, L).

    Positions below `sink_tokens` (each packed sequence restarts at 0) keep t = 0.
    """
    g, t = (x.to(positions.device) for x in (g, t))
    g, t = (x if x.ndim == 2 else x[:, None] for x in (g, t))
    return (positions.to(torch.float32) + torch.where(positions >= sink_tokens, t, 0.0)) / g


def sequence_ids(positions: torch.Tensor) -> torch.Tensor:
    """The index (0, 1, ... over the whole batch) of the sequence each token of (B, L) positions belongs to: a
    sequence starts at every row's first token and wherever the positions restart at 0 (padding-free packing)."""
    starts = positions == 0
    starts[:, 0] = True
    return starts.flatten().cumsum(0).view_as(positions) - 1


class E2LLMAugmentation:
    """Draws (g, t) for every row of every training forward and returns its RoPE positions."""

    def __init__(
        self,
        g_max: int,
        training_length: int,
        sink_tokens: int = 4,
        seed: int = 0,
        g_weights: tuple[float, ...] = (),
    ):
        check_int("training", "g_max", g_max, minimum=1)
        check_int("training", "sink_tokens", sink_tokens, minimum=0)
        check_g_weights(g_weights, g_max)
        self.g_max = g_max
        self.training_length = training_length
        self.sink_tokens = sink_tokens
        self.g_weights = torch.tensor(g_weights, dtype=torch.float64) if g_weights else None
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g (in {1..g_max}, uniform or by `g_weights`) and t (uniform integer in [0, g·L - R]) for rows of lengths R
        (B,), as fp32."""
        rows = lengths.shape[0]
        if self.g_weights is None:
            g = torch.randint(1, self.g_max + 1, (rows,), generator=self.generator)
        else:
            g = torch.multinomial(self.g_weights, rows, replacement=True, generator=self.generator) + 1
        # A row longer than g·L (only possible for g = 1 when R > L) cannot be shifted: t = 0.
        t_max = (g * self.training_length - lengths.cpu()).clamp(min=0)
        t = torch.floor(torch.rand(rows, generator=self.generator, dtype=torch.float64) * (t_max + 1))
        return g.to(torch.float32), t.to(torch.float32)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE positions for a training forward: one (g, t) per sequence (per row, or per packed sequence)."""
        sp = sequence_parallel.active()
        # Under sequence parallelism (never packed) this is one shard of each row, its padding at position 0: one
        # sequence per row, as long as the largest position of any shard, so that every rank of the group draws
        # the same number of (g, t) and the same values (same seed, same R).
        ids = sequence_ids(positions) if sp is None else torch.arange(len(positions))[:, None].expand_as(positions)
        lengths = positions.new_zeros(int(ids.max()) + 1).scatter_reduce(
            0, ids.flatten().to(positions.device), positions.flatten() + 1, "amax"
        )
        g, t = self.draw(sequence_parallel.reduce_max(lengths, sp))
        return e2llm_positions(positions, g[ids.cpu()], t[ids.cpu()], self.sink_tokens)


def start_augmentation(
    model, g_max: int, sink_tokens: int = 4, seed: int = 0, g_weights: tuple[float, ...] = ()
) -> E2LLMAugmentation:
    """Turn E2-LLM's augmentation on for a model patched with rope.scaling e2llm (dense attention)."""
    state = e2llm_positions_of(model)
    if not state.dense:
        raise LcpatchError(
            "E2-LLM training needs attention.method dense: Λ attention methods rotate keys themselves. "
            "Train with the dense recipe, then apply the Λ method for inference."
        )
    augmentation = E2LLMAugmentation(g_max, state.training_length, sink_tokens, seed, g_weights)
    state.augmentation = augmentation
    return augmentation


def stop_augmentation(model) -> None:
    """Back to inference positions (m / g) for this model, in training mode too."""
    e2llm_positions_of(model).augmentation = None


class E2LLMCallback(TrainerCallback):
    """E2-LLM augmentation for the model a transformers Trainer or TRL SFTTrainer trains.

    Each data-parallel rank draws from its own seed (`seed` or TrainingArguments.seed, plus the rank), so
    they see different (g, t); the processes of one sequence-parallel group share it, as they share rows.
    """

    def __init__(self, g_max: int, sink_tokens: int = 4, seed: int | None = None, g_weights: tuple[float, ...] = ()):
        check_int("training", "g_max", g_max, minimum=1)
        check_g_weights(g_weights, g_max)
        self.g_max, self.sink_tokens, self.seed, self.g_weights = g_max, sink_tokens, seed, tuple(g_weights)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # SP groups are consecutive ranks (DeepSpeed's and lcpatch's): the group's index is the data rank.
        base = args.seed if self.seed is None else self.seed
        seed = base + args.process_index // sequence_parallel.configured_size()
        start_augmentation(model, self.g_max, self.sink_tokens, seed, self.g_weights)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        stop_augmentation(model)
