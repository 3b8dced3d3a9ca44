"""InfLLM wave by wave (`infllm_waves`) against the reference's walk over execution blocks, one layer.

Both run the same forward passes over their own cache layer; after every pass the outputs, the
memory blocks formed, their representative keys and the ring's scores must agree. The cases cover
waves of several execution blocks (n_local several execution blocks wide, or not a multiple of one),
passes that are not a multiple of an execution block, ragged rows, decoding one token at a time,
offloaded blocks with a device cache smaller than a wave's selections, and topk 0. The Triton engine
runs under TRITON_INTERPRET=1 on CPU; with LCPATCH_TEST_FULL=1 on a CUDA machine every engine runs on
the GPU, and a case at the published sizes is added:
LCPATCH_TEST_FULL=1 python -m pytest tests/test_infllm_waves.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_mode import DEVICE, FULL, skip_module_unless_runnable  # first: sets TRITON_INTERPRET

from lcpatch.attention.infllm_reference import execution_block_attention, infllm_attention_reference
from lcpatch.attention.infllm_waves import infllm_attention_waves, waves
from lcpatch.cache.block_memory import BlockMemoryLayer, build_plan
from lcpatch.kernels.infllm_split import execution_block_attention_split
from lcpatch.kernels.specs import InfLLMSpec, Rotary, StepInfo

skip_module_unless_runnable()

SPEC = InfLLMSpec(n_init=4, n_local=24, block_size=4, repr_topk=2, topk=3, exc_block_size=8)
HQ, HKV, DIM = (8, 2, 128) if FULL else (4, 2, 16)
ROTARY = Rotary(1.0 / 10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))

CASES = {
    # name: (spec, passes: list of per-row real-token counts, offload)
    "one-pass": (SPEC, [[150, 150]], "gpu"),
    "ragged-one-pass": (SPEC, [[150, 97]], "gpu"),
    "chunks": (SPEC, [[48, 48], [48, 48], [48, 48], [5, 5]], "gpu"),
    "ragged-chunks-then-decode": (SPEC, [[64, 41], [64, 64], [1, 1], [1, 1], [1, 1]], "gpu"),
    "n_local-not-a-multiple": (InfLLMSpec(4, 20, 4, 2, 3, 8), [[131, 120], [37, 37]], "gpu"),
    "exc-block-of-one-token": (InfLLMSpec(2, 6, 2, 1, 2, 1), [[30, 23], [1, 1]], "gpu"),
    "offloaded-small-cache": (SPEC, [[150, 140], [1, 1]], "cpu"),
    "no-memory-selected": (InfLLMSpec(4, 24, 4, 2, 0, 8), [[100, 100]], "gpu"),
}
if FULL:  # the published configuration, two 8k chunks and a decode step
    CASES["published"] = (InfLLMSpec(128, 4096, 128, 4, 16, 512), [[8192], [8192], [1]], "gpu")


def triton_engine(*args):
    kernels = pytest.importorskip("lcpatch.kernels.infllm", reason="triton is not installed")
    return kernels.execution_block_attention_triton(*args)


ENGINES = {
    "reference": execution_block_attention,
    "split": lambda *a: execution_block_attention_split(*a[:8]),  # no softcap or dropout arguments
    "triton": triton_engine,
}


def passes(spec, counts_per_pass, seed=0):
    """Per pass: q, k, v (B, H, L, D), a left-padded StepInfo, continuing each row's positions."""
    generator = torch.Generator().manual_seed(seed)
    seen = [0] * len(counts_per_pass[0])
    for counts in counts_per_pass:
        length = max(counts)
        valid = torch.tensor([[column >= length - n for column in range(length)] for n in counts])
        positions = (valid.cumsum(1) - 1).clamp_min(0) + torch.tensor(seen)[:, None]
        seen = [s + n for s, n in zip(seen, counts, strict=True)]
        tensors = [torch.randn(len(counts), h, length, DIM, generator=generator) for h in (HQ, HKV, HKV)]
        yield (*(t.to(DEVICE) for t in tensors), StepInfo(positions.to(DEVICE), valid.to(DEVICE)))


def state(layer: BlockMemoryLayer):
    count = max(layer.counts)
    return layer.counts, layer.representatives[:, :count], layer.ring_scores[:, :, :-1]


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_waves_equal_the_reference_walk(case, engine):
    spec, counts_per_pass, offload = CASES[case]
    if case == "published" and engine == "reference":
        pytest.skip("the reference engine's fp32 score matrices at 8k x 6k are slow and add nothing here")
    attention = ENGINES[engine]
    rotary = Rotary(ROTARY.inv_freq.to(DEVICE))
    layers = [BlockMemoryLayer(spec, offload, max_cached_blocks=spec.topk) for _ in range(2)]
    seen = None
    for q, k, v, step in passes(spec, counts_per_pass):
        for layer in layers:
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
        plan, seen_after = build_plan(step, seen or [0] * q.shape[0], spec)
        seen = seen_after
        expected = infllm_attention_reference(q, k, v, plan, layers[0], spec, rotary, 0.25, None, 0.0, attention)
        actual = infllm_attention_waves(q, k, v, plan, layers[1], spec, rotary, 0.25, None, 0.0, attention)
        valid = step.valid[:, :, None, None]
        torch.testing.assert_close(actual * valid, expected * valid, atol=2e-5, rtol=2e-5)
        (counts, reps, scores), (want_counts, want_reps, want_scores) = state(layers[1]), state(layers[0])
        assert counts == want_counts
        torch.testing.assert_close(reps, want_reps, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(scores, want_scores, atol=2e-5, rtol=2e-5)
    assert max(layers[1].counts) >= (0 if spec.topk == 0 else 3)  # memory did form and was used


def test_waves_never_hold_blocks_n_local_apart():
    assert [list(w) for w in waves(5, 8, 24)] == [[0, 1, 2], [3, 4]]
    assert [list(w) for w in waves(5, 8, 25)] == [[0, 1, 2, 3], [4]]
    assert [list(w) for w in waves(3, 1, 1)] == [[0], [1], [2]]
