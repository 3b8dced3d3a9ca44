"""InfLLM's execution blocks on SDPA (the torch backend) against the reference, on the very calls a model
makes: chunked prefill with left padding, formed and selected memory blocks, near keys past the local
window, decode. Each call's output, the attention each near token gets from its own block (what block
formation reads) and the gradients must match the reference to 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch

import lcpatch
from lcpatch.attention import backends
from lcpatch.attention.backends import TORCH
from lcpatch.attention.infllm_attention import InfLLMAttention
from lcpatch.attention.infllm_reference import execution_block_attention
from lcpatch.kernels.infllm_split import execution_block_attention_split

from tiny_models import random_ids, tiny_model

CFG = dict(
    n_init=4, n_local=16, block_size=4, topk=2, repr_topk=2, exc_block_size=8, chunk_size=16, max_cached_blocks=3
)


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).detach().abs().amax().item() if a.numel() else 0.0


def grad_of(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def compared(calls: list, backward: bool):
    """A block attention that runs both engines on the same (leaf copies of the) inputs and records the gaps."""

    def both(query, query_positions, query_valid, near, memory, spec, rotary, scaling, softcap, dropout):
        assert softcap is None and dropout == 0.0
        leaves = lambda: [t.detach().clone().requires_grad_(backward) for t in (query, *near[:2], *memory[:2])]  # noqa: E731
        mine, theirs = leaves(), leaves()

        def run(engine, q, near_k, near_v, mem_k, mem_v):
            args = (q, query_positions, query_valid, (near_k, near_v, *near[2:]), (mem_k, mem_v, memory[2]), spec)
            return engine(*args, rotary, scaling)

        out, attention = run(execution_block_attention_split, *mine)
        ref, ref_attention = run(execution_block_attention, *theirs)
        real = query_valid[:, None, :, None]
        gaps = {
            "out": ((out - ref) * real).abs().max().item(),
            "near_attention": (attention - ref_attention).abs().max(),
        }
        if backward:
            grad = torch.randn_like(ref) * real
            (out * grad).sum().backward()
            (ref * grad).sum().backward()
            for name, a, b in zip(("dq", "dk_near", "dv_near", "dk_memory", "dv_memory"), mine, theirs, strict=True):
                gaps[name] = gap(grad_of(a), grad_of(b))
        calls.append((query.shape[2], memory[0].shape[2], gaps))
        return ref, ref_attention

    return both


@pytest.mark.parametrize("backward", [False, True], ids=["inference", "gradients"])
def test_split_matches_reference_on_a_models_calls(monkeypatch, backward):
    model = tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    calls = []
    monkeypatch.setattr(InfLLMAttention, "_block_attention", lambda self, *a: compared(calls, backward))
    ids = random_ids(70, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.set_grad_enabled(backward), lcpatch.patched(model, {"attention": {"method": "infllm", **CFG}}):
        model(ids, attention_mask=mask, position_ids=positions)
        if not backward:
            model.generate(ids[:1, :40], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert any(selected for _, selected, _ in calls), "no call read memory blocks: the test lost its point"
    assert {1, 8} <= {length for length, _, _ in calls} or backward  # prefill blocks and decode steps
    worst = {name: max(gaps[name] for _, _, gaps in calls) for name in calls[0][2]}
    assert all(gap <= 1e-5 for gap in worst.values()), worst


def test_torch_backend_runs_the_split_and_sends_softcap_to_the_reference(monkeypatch):
    recorded, split_calls = [], []

    def recorder(*args):
        recorded.append(args)
        return backends.torch_block_attention(*args)

    monkeypatch.setattr(
        backends,
        "execution_block_attention_split",
        lambda *a: split_calls.append(1) or execution_block_attention_split(*a),
    )
    monkeypatch.setattr(InfLLMAttention, "_block_attention", lambda self, *a: recorder)
    assert TORCH.block_attention(None, None, None, None, 0.0) is backends.torch_block_attention
    model = tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad(), lcpatch.patched(model, {"attention": {"method": "infllm", **CFG}}):
        model(random_ids(40))
    assert len(split_calls) == len(recorded) > 0

    args = recorded[-1][:-2]
    with pytest.warns(RuntimeWarning, match="softcap 2.0"):
        out, attention = backends.torch_block_attention(*args, 2.0, 0.0)
    ref, ref_attention = execution_block_attention(*args, 2.0, 0.0)
    assert torch.equal(out, ref) and torch.equal(attention, ref_attention)
