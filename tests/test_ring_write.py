"""The ring cache's one-launch decode write (`kernels/ring_write.py`) against its spec, the cache's PyTorch
`_write` with the Triton backend's `rotate_stored`: the same bits in every buffer after every token.

Runs under TRITON_INTERPRET=1 on CPU. With LCPATCH_TEST_FULL=1 on a CUDA machine the same checks run
compiled, and the GPU-marked one at a real model's size:  LCPATCH_TEST_FULL=1 python -m pytest tests/test_ring_write.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_mode import DEVICE, FULL, skip_module_unless_runnable  # first: sets TRITON_INTERPRET

pytest.importorskip("triton")

from sm90_compile import compile_in_subprocess

from lcpatch.attention.backends import TORCH, TRITON
from lcpatch.cache import RingLambdaCache
from lcpatch.kernels import ring_write
from lcpatch.kernels.specs import LambdaSpec, Rotary, StepInfo

skip_module_unless_runnable(ring_write._ring_write_kernel)


def rope(dim: int, scale: float = 1.0, rotated: int | None = None) -> Rotary:
    rotated = rotated or dim
    return Rotary(1.0 / (10000 ** (torch.arange(0, rotated, 2, device=DEVICE) / rotated)), scale)


def tokens(starts: list[int], length: int, heads: int, dim: int, dtype: torch.dtype, seed: int, pad=None):
    """One update: keys and values (B, H, L, D) in the layout of transformers' projections, and the rows'
    positions from `starts` on, valid but for the first pad[b] tokens of row b (at position 1, as padding is)."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    k, v = (torch.randn(len(starts), length, heads, dim, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    positions = torch.tensor(starts, device=DEVICE)[:, None] + torch.arange(length, device=DEVICE)
    valid = torch.arange(length, device=DEVICE) >= torch.tensor(pad or [0] * len(starts), device=DEVICE)[:, None]
    return k.transpose(1, 2), v.transpose(1, 2), StepInfo(positions.masked_fill(~valid, 1), valid)


def run_both(spec: LambdaSpec, rotary: Rotary, updates, fused_expected: bool = True) -> None:
    """Feed the same updates to the spec's cache and the fused one; after each, every tensor they hold is equal."""
    taken = []

    def fused_write(*args):
        taken.append(TRITON.write_ring_token(*args))
        return taken[-1]

    reference = RingLambdaCache([spec], [rotary], TRITON.rotate_stored, TORCH.write_ring_token)
    fused = RingLambdaCache([spec], [rotary], TRITON.rotate_stored, fused_write)
    with torch.no_grad():
        for k, v, step in updates:
            for cache in (reference, fused):
                cache.step = step
                cache.layers[0].update(k, v)
            a, b = reference.layers[0], fused.layers[0]
            for name in ("key_buffer", "value_buffer", "slot_positions", "slot_valid", "written"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (name, step.positions[:, -1].tolist())
    decode_steps = sum(k.shape[2] == 1 for k, _, _ in updates)
    assert taken == [fused_expected] * decode_steps


def decode_stream(g: int, w: int, heads: int, dim: int, dtype: torch.dtype, steps: int, prompt: int = 6):
    """A prompt chunk then `steps` single tokens, three rows: one from position 0, one left-padded to two
    tokens (its decode steps write sinks), one near a million; rows go invalid (padding) at some steps."""
    starts, pad = [0, -4, 1_000_000 - prompt], [0, 4, 0]
    updates = [tokens(starts, prompt, heads, dim, dtype, seed=0, pad=pad)]
    for i in range(steps):
        k, v, step = tokens([s + prompt + i for s in starts], 1, heads, dim, dtype, seed=i + 1)
        invalid = torch.tensor([i % 5 == 3, i == 1, i % 7 == 2], device=DEVICE)[:, None]  # row 1: at a sink slot
        updates.append((k, v, StepInfo(step.positions, step.valid & ~invalid)))
    return updates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g", [4, 0], ids=["sinks", "no-sinks"])
@pytest.mark.parametrize("scale", [1.0, 1.3], ids=["scale-1", "scale-1.3"])
def test_fused_write_stores_the_reference_bits(dtype, g, scale):
    """Over 20 tokens the ring of 8 wraps twice; sinks come in during decode; three KV heads pad the tile's 4."""
    run_both(LambdaSpec(g, 8, 12), rope(64, scale), decode_stream(g, 8, 3, 64, dtype, steps=20))


def test_one_kv_head_and_head_dim_128():
    run_both(LambdaSpec(2, 4, None), rope(128, 1.1), decode_stream(2, 4, 1, 128, torch.bfloat16, steps=7))


def test_partial_rotary_takes_the_pytorch_write():
    """The kernels rotate whole heads only: the backend declines, and the cache's own write runs."""
    updates = decode_stream(4, 8, 2, 64, torch.float32, steps=3)
    run_both(LambdaSpec(4, 8, 12), rope(64, rotated=32), updates, fused_expected=False)


def test_fused_write_matches_the_pytorch_spec():
    """The stored keys are `Rotary.rotate_stored`'s, a million positions in, within the rope kernel's tolerance."""
    spec, rotary = LambdaSpec(4, 8, 12), rope(64, 1.3)
    fused = RingLambdaCache([spec], [rotary], TRITON.rotate_stored, TRITON.write_ring_token)
    spec_cache = RingLambdaCache([spec], [rotary], TORCH.rotate_stored, TORCH.write_ring_token)
    with torch.no_grad():
        for k, v, step in decode_stream(4, 8, 2, 64, torch.float32, steps=12):
            for cache in (fused, spec_cache):
                cache.step = step
                cache.layers[0].update(k, v)
    a, b = fused.layers[0], spec_cache.layers[0]
    assert torch.allclose(a.key_buffer, b.key_buffer, atol=2e-5)
    for name in ("value_buffer", "slot_positions", "slot_valid", "written"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_ring_write_compiles_for_hopper():
    """Each head dim and dtype, and the one-KV-head tile, compile for sm_90 (the interpreter does not check
    Triton's typing)."""
    compile_in_subprocess("ring_write_variants()")


@pytest.mark.gpu
@pytest.mark.skipif(not FULL, reason="the compiled kernel on a CUDA device: LCPATCH_TEST_FULL=1")
@pytest.mark.parametrize("g", [4, 10])
def test_real_size_on_gpu(g):
    """A Llama-3-8B layer's cache (8 KV heads of 128, window 4096, bf16) at batch 8: prompts of 4,090 tokens
    (left-padded, some rows a million positions in) then 20 tokens, through the ring's wraparound."""
    w, prompt = 4096, 4090
    starts = [0, -4088, -7, 1_000_000, 17, 0, -4085, 123_456]
    pad = [0, 4088, 7, 0, 0, 0, 4085, 0]
    updates = [tokens(starts, prompt, 8, 128, torch.bfloat16, seed=0, pad=pad)]
    for i in range(20):
        k, v, step = tokens([s + prompt + i for s in starts], 1, 8, 128, torch.bfloat16, seed=i + 1)
        invalid = torch.arange(8, device=DEVICE)[:, None] == i % 9  # a padding row at most steps
        updates.append((k, v, StepInfo(step.positions, step.valid & ~invalid)))
    run_both(LambdaSpec(g, w, 4096 + g), rope(128, 1.2), updates)
