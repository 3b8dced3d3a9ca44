"""InfLLM through the Λ prefill kernel against the PyTorch reference, end to end on a tiny model.

On CPU the kernel runs under TRITON_INTERPRET=1 at small sizes; with LCPATCH_TEST_FULL=1 on a CUDA
machine the same checks run compiled:  LCPATCH_TEST_FULL=1 python -m pytest tests/test_infllm_kernels.py
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_mode import DEVICE, skip_module_unless_runnable  # first: sets TRITON_INTERPRET

pytest.importorskip("triton")
kernels = pytest.importorskip("lcpatch.kernels.infllm")

import lcpatch  # noqa: E402
from lcpatch.attention.infllm_attention import InfLLMAttention  # noqa: E402

from tiny_models import random_ids, tiny_model  # noqa: E402

skip_module_unless_runnable(importlib.import_module("lcpatch.kernels.lambda_prefill")._lambda_fwd)

CFG = dict(
    n_init=4, n_local=16, block_size=4, topk=2, repr_topk=2, exc_block_size=8, chunk_size=16, max_cached_blocks=3
)


def run(monkeypatch, kernel: bool, dtype=torch.float32):
    """Logits of a left-padded forward and greedy tokens + step logits of a generate, on a head-dim-64 model."""
    model = tiny_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, dtype=dtype).to(DEVICE)
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return kernels.execution_block_attention_triton(*args)

    if kernel:
        monkeypatch.setattr(InfLLMAttention, "_block_attention", lambda self, *a: counted)
    ids = random_ids(60, batch=2).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), lcpatch.patched(model, {"attention": {"method": "infllm", **CFG}}):
        logits = model(ids, attention_mask=mask, position_ids=positions).logits
        out = model.generate(
            ids[:1, :40],
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    monkeypatch.undo()
    assert kernel == bool(calls) and (not kernel or {1, 8} <= {shape[2] for shape in calls})  # prefill and decode
    return logits.float().masked_fill(~mask.bool()[..., None], 0.0), out.sequences, torch.stack(out.logits).float()


def test_kernel_matches_reference_in_a_model(monkeypatch):
    reference = run(monkeypatch, kernel=False)
    got = run(monkeypatch, kernel=True)
    assert (got[0] - reference[0]).abs().max() <= 1e-4
    assert torch.equal(got[1], reference[1])
    assert (got[2] - reference[2]).abs().max() <= 1e-4


def test_kernel_in_half_precision_stays_close(monkeypatch):
    reference = run(monkeypatch, kernel=False)
    got = run(monkeypatch, kernel=True, dtype=torch.float16)
    assert torch.isfinite(got[0]).all()
    assert (got[0] - reference[0]).abs().max() < 0.1 * reference[0].abs().max()


def test_each_call_matches_the_reference_engine(monkeypatch):
    """Every execution block a model sends, prefill blocks (prefill kernel) and decode steps (decode kernel):
    the output, and the attention each near token gets from its own block (what block formation reads)."""
    from lcpatch.attention.infllm_reference import execution_block_attention

    model = tiny_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1).to(DEVICE)
    gaps = []

    def both(query, query_positions, query_valid, *args):
        out, attention = kernels.execution_block_attention_triton(query, query_positions, query_valid, *args)
        ref, ref_attention = execution_block_attention(query, query_positions, query_valid, *args)
        real = query_valid[:, None, :, None]
        gaps.append((query.shape[2], ((out - ref) * real).abs().max().item(), (attention - ref_attention).abs().max()))
        return ref, ref_attention

    monkeypatch.setattr(InfLLMAttention, "_block_attention", lambda self, *a: both)
    ids = random_ids(40).to(DEVICE)
    with torch.no_grad(), lcpatch.patched(model, {"attention": {"method": "infllm", **CFG}}):
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert {1, 8} <= {length for length, _, _ in gaps}
    assert max(gap for _, gap, _ in gaps) <= 1e-4
    assert max(gap for _, _, gap in gaps) <= 1e-5


def test_decode_steps_on_the_kernel_equal_the_reference_walk(monkeypatch):
    """Fixed-shape decode steps (generation.decode: static, what a CUDA graph replays) on the decode kernel over
    the step buffer (`infllm_decode`), against the eager reference: a left-padded batch whose rows form
    memory blocks while decoding, so that the own-block scores the kernel path adds pick their representatives."""
    model = tiny_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1).to(DEVICE)
    ids = random_ids(37, batch=2).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    options = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    runs, steps = {}, []

    def counted(*args):
        steps.append(args[0].shape)
        return kernels.decode_step_triton(*args)

    for decode in ("eager", "static"):
        if decode == "static":
            monkeypatch.setattr(
                InfLLMAttention, "_block_attention", lambda self, *a: kernels.execution_block_attention_triton
            )
            monkeypatch.setattr(InfLLMAttention, "_decode_engine", lambda self, *a: counted)
        recipe = {"attention": {"method": "infllm", **CFG}, "generation": {"decode": decode}}
        with torch.no_grad(), lcpatch.patched(model, recipe):
            runs[decode] = model.generate(ids, return_dict_in_generate=True, output_logits=True, **options)
    monkeypatch.undo()
    assert len(steps) == 23 * 2  # every decode step of both layers went through the kernel path
    eager, static = runs["eager"], runs["static"]
    assert torch.equal(static.sequences, eager.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(static.logits, eager.logits, strict=True)) <= 1e-4
    blocks = static.past_key_values.memory_blocks()
    assert blocks == eager.past_key_values.memory_blocks() and min(blocks[0]) >= 7  # 6 formed while decoding
    for mine, theirs in zip(static.past_key_values.layers, eager.past_key_values.layers, strict=True):
        torch.testing.assert_close(mine.ring_scores, theirs.ring_scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.representatives, theirs.representatives, atol=1e-5, rtol=1e-5)
