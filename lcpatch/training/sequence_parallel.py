"""Sequence parallelism (SP) for lcpatch's training losses: one sequence split along its length over the
processes of an SP group, with the losses the same as on one process.

What has to stay global when a row is cut into shards:

- positions: every shard keeps the row's own position ids (E2-LLM's (m + t) / g and LOGO's synthesised
  ids included), so RoPE, E2-LLM's draw and the causal order see the whole row;
- labels: shifted over the whole row *before* it is cut, so the last token of shard r predicts the first
  token of shard r + 1 (`shift_labels`, DeepSpeed's data-loader adapter format);
- per-sequence sums: each shard scores its own tokens; the sums of log-probs and the token counts are
  summed over the group before the preference loss (a DPO sigmoid or a SimPO mean-log-prob is not a sum
  over shards, so reducing the loss instead would be wrong).

Attention: `enable(model, group)` routes the model's attention through `ulysses_attention` (transformers'
AttentionInterface): an all-to-all turns sequence shards into head shards, sdpa's causal kernel attends over the whole row for num_heads / size heads, and a second all-to-all
turns the result back. It ignores the attention mask, so rows must be right-padded (the collators are).
Λ attention (lm-infinite, streaming-llm) and InfLLM place and rotate keys themselves over the local
sequence; they are refused under SP. Under DeepSpeed's Ulysses (accelerate's parallelism config,
recipes/accelerate/zero3-ulysses.yaml) DeepSpeed owns the group and the attention; `active()` returns its group.

Gradients: every rank of the group computes the same loss from the reduced sums, and the collectives'
backward sums the group's gradients, so each rank's gradient is size x its share; data-parallel averaging
over all processes (DDP, ZeRO) divides it back — the convention of DeepSpeed's Ulysses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..errors import LcpatchError

ATTENTION = "lcpatch_ulysses"
# The kernel Ulysses attention wraps: sdpa applies the causal mask itself when given none (eager needs a
# materialised mask; flash attention would need the gathered position ids, untested here: DeepSpeed's Ulysses has it).
CORE_KERNEL = "sdpa"
IGNORE = -100


@dataclass(frozen=True)
class SequenceParallel:
    """An SP group: its process group, this process's rank in it, and its size."""

    group: Any
    rank: int
    size: int

    @classmethod
    def of(cls, group) -> SequenceParallel:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))


_ENABLED: SequenceParallel | None = None  # one SP group per process, as under DeepSpeed


def active() -> SequenceParallel | None:
    """The SP group losses reduce over: lcpatch's (`enable`), else DeepSpeed's Ulysses group when accelerate's
    parallelism config turned it on (`accelerate launch` exports it as PARALLELISM_CONFIG_*), else None."""
    if _ENABLED is not None:
        return _ENABLED
    if uses_deepspeed() and dist.is_initialized():
        from deepspeed.utils import groups  # only reachable under accelerate's DeepSpeed SP, which imports it

        return SequenceParallel.of(groups._get_sequence_parallel_group())
    return None


def uses_deepspeed() -> bool:
    """Whether DeepSpeed's Ulysses (not lcpatch's `enable`) runs this job's sequence parallelism."""
    return _ENABLED is None and configured_size() > 1


def configured_size() -> int:
    """The SP size of this run (1 without SP), known before the SP group exists (e.g. to seed per data rank)."""
    if _ENABLED is not None:
        return _ENABLED.size
    return int(os.environ.get("PARALLELISM_CONFIG_SP_SIZE", "1"))


def check_attention(model) -> None:
    """Refuse attention methods that cannot run on sequence shards."""
    from ..api import patched_recipe

    recipe = patched_recipe(model)
    if recipe is not None and recipe.attention.method != "dense":
        raise LcpatchError(
            f"attention.method {recipe.attention.method} cannot train under sequence parallelism: it places and "
            "rotates keys over the whole local sequence, which each process holds only a shard of. Train with "
            "attention dense (the Λ / InfLLM methods apply at inference), or without sequence parallelism."
        )


def enable(model, group) -> SequenceParallel:
    """Run `model`'s attention as Ulysses attention over `group` (a torch.distributed process group)."""
    global _ENABLED
    check_attention(model)
    core = model.config._attn_implementation
    if core != CORE_KERNEL:
        raise LcpatchError(
            f"lcpatch's Ulysses attention wraps attn_implementation {CORE_KERNEL!r}; the model uses {core!r}. "
            f"Load it with attn_implementation='{CORE_KERNEL}' (or use DeepSpeed's Ulysses for flash attention)."
        )
    sp = SequenceParallel.of(group)
    config = model.config.get_text_config()
    for name in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, name) % sp.size:
            raise LcpatchError(
                f"Ulysses attention splits heads over the SP group: {name} = {getattr(config, name)} is not a "
                f"multiple of the SP size {sp.size}; pick an SP size that divides it."
            )
    _ENABLED = sp
    model.set_attn_implementation(ATTENTION)
    return sp


def disable(model) -> None:
    """Back to the model's own attention, on the whole sequence."""
    global _ENABLED
    if _ENABLED is not None:
        model.set_attn_implementation(CORE_KERNEL)
        _ENABLED = None


# -- batches ------------------------------------------------------------------------------------


def shard_batch(batch: dict[str, torch.Tensor], sp: SequenceParallel) -> dict[str, torch.Tensor]:
    """This rank's shard of a right-padded batch: input_ids, attention_mask, position_ids (global: the
    batch's own, or 0..T-1) and shift_labels (labels shifted over the whole row, then cut). Rows are padded
    on the right to a multiple of sp.size (pad positions 0, so a row's largest position is unchanged)."""
    ids = batch["input_ids"]
    rows, length = ids.shape
    mask = batch.get("attention_mask", torch.ones_like(ids))
    if (mask.diff(dim=1) > 0).any():
        raise LcpatchError(
            "sequence parallelism needs right-padded rows (Ulysses attention is causal and reads no mask); "
            "set the tokenizer's / collator's padding side to right."
        )
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=ids.device).expand(rows, -1)
    labels = batch.get("labels", torch.full_like(ids, IGNORE))
    full = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "shift_labels": torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE)], dim=1),
    }
    pad = -length % sp.size
    fill = {"input_ids": 0, "attention_mask": 0, "position_ids": 0, "shift_labels": IGNORE}
    width = (length + pad) // sp.size
    return {
        key: torch.nn.functional.pad(value, (0, pad), value=fill[key])[:, sp.rank * width : (sp.rank + 1) * width]
        for key, value in full.items()
    }


# -- collectives (differentiable) -----------------------------------------------------------------
# Written out rather than taken from torch.distributed.nn.functional, deprecated since torch 2.9. Each
# backward sums the gradients of the group's identical losses (see the module docstring).


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


class _AllToAll(torch.autograd.Function):
    """Chunk i of dim 0 goes to rank i; rank i's chunk arrives at place i. Its own adjoint."""

    @staticmethod
    def forward(ctx, chunks, group):
        ctx.group = group
        chunks = chunks.contiguous()  # before empty_like: the collective writes a contiguous buffer
        out = torch.empty_like(chunks)
        dist.all_to_all_single(out, chunks, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, sp):
        ctx.sp = sp
        parts = [torch.empty_like(tensor) for _ in range(sp.size)]
        dist.all_gather(parts, tensor.contiguous(), group=sp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        sp = ctx.sp
        width = grad.shape[1] // sp.size
        return _AllReduceSum.apply(grad.contiguous(), sp.group)[:, sp.rank * width : (sp.rank + 1) * width], None


def reduce_sum(tensor: torch.Tensor, sp: SequenceParallel | None) -> torch.Tensor:
    """The sum of `tensor` over the SP group (per-sequence log-prob sums, token counts)."""
    return tensor if sp is None else _AllReduceSum.apply(tensor, sp.group)


def reduce_max(tensor: torch.Tensor, sp: SequenceParallel | None) -> torch.Tensor:
    """The maximum over the SP group, without gradient (e.g. a row's length from its shards' positions)."""
    if sp is None:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=sp.group)
    return tensor


def gather_sequence(tensor: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Per-token values (B, T / size) of every shard, joined into the whole rows (B, T)."""
    return _GatherSequence.apply(tensor, sp)


# The per-token fields of TRL's fused LM-head output (trl.trainer.utils.FusedCausalLMOutput).
PER_TOKEN_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


class ShardedForward:
    """`model` called with whole rows (as TRL's preference trainers call it, `fused_lm_head=True`), run on
    this rank's shard with the labels shifted globally; the per-token outputs of the shards are gathered
    back into whole rows (B, T - 1), so that TRL's own per-sequence sums (and metrics) are over the whole
    sequence."""

    def __init__(self, model, sp: SequenceParallel):
        self.model, self.sp = model, sp

    def __call__(self, input_ids, attention_mask=None, labels=None, position_ids=None, **kwargs):
        given = {"attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}
        batch = {"input_ids": input_ids, **{key: value for key, value in given.items() if value is not None}}
        outputs = self.model(**shard_batch(batch, self.sp), **kwargs)
        for name in PER_TOKEN_OUTPUTS:
            value = outputs.get(name)
            if value is not None:
                # gloo gathers no bool tensors: is_top1 / label_mask travel as bytes
                whole = gather_sequence(value.byte() if value.dtype == torch.bool else value, self.sp)
                outputs[name] = whole.to(value.dtype)[:, : input_ids.shape[1] - 1]
        return outputs


def sharded(model):
    """`model` itself without SP, else its `ShardedForward` over the active group."""
    sp = active()
    return model if sp is None else ShardedForward(model, sp)


# -- attention ------------------------------------------------------------------------------------


def _sequence_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, H, T/n, D) sequence shard -> (B, H/n, T, D) head shard."""
    b, h, t, d = x.shape
    chunks = x.view(b, sp.size, h // sp.size, t, d).transpose(0, 1)  # (n: head group, B, H/n, T/n, D)
    received = _AllToAll.apply(chunks, sp.group)  # (n: sequence shard, B, H/n, T/n, D)
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // sp.size, sp.size * t, d)


def _heads_to_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, T, H/n, D) attention output of a head shard -> (B, T/n, H, D) of a sequence shard."""
    b, t, h, d = x.shape
    chunks = x.view(b, sp.size, t // sp.size, h, d).transpose(0, 1)  # (n: sequence shard, B, T/n, H/n, D)
    received = _AllToAll.apply(chunks, sp.group)  # (n: head group, B, T/n, H/n, D)
    return received.permute(1, 2, 0, 3, 4).reshape(b, t // sp.size, sp.size * h, d)


def ulysses_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal attention over the whole row for this rank's heads; query/key/value are sequence shards.

    The mask transformers built for the shard is dropped: the kernel's own causal mask over the whole
    row is the right one for right-padded rows (pads come after every real token)."""
    if _ENABLED is None:
        raise LcpatchError(
            f"attn_implementation {ATTENTION!r} runs only between lcpatch.training.sequence_parallel.enable() "
            "and disable(); call enable(model, group)."
        )
    sp = _ENABLED
    query, key, value = (_sequence_to_heads(x, sp) for x in (query, key, value))
    kwargs.pop("position_ids", None)  # the shard's; sdpa without a mask reads none
    output, _ = AttentionInterface()[CORE_KERNEL](module, query, key, value, None, **kwargs)
    return _heads_to_sequence(output, sp), None


def _no_mask(*args, **kwargs):
    return None  # Ulysses attention builds its causal mask over the whole row; a shard's mask is never read


AttentionInterface.register(ATTENTION, ulysses_attention)
AttentionMaskInterface.register(ATTENTION, _no_mask)
