"""The decode kernel's configs: every launch mode (one split writing the output, splits merged by the
last program, splits merged by a second kernel) and every config the GPU sweep times give the
reference's output; the split plan follows the config. Runs under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch
from kernel_mode import DEVICE, skip_module_unless_runnable  # first: sets TRITON_INTERPRET

pytest.importorskip("triton")

from lambda_cases import Case, cache_layout, make_qkv, rotary, run_both
from sm90_compile import compile_in_subprocess

from lcpatch.kernels import lambda_decode as decode
from lcpatch.kernels.lambda_reference import rotate_slots

skip_module_unless_runnable(decode._lambda_decode_split)

# 4 sinks + a window of 120 + 1 new token = 125 slots: 4 tiles of 32, 1 of 128.
CASE = Case("decode-configs", 1, 0, 120, batch=2, kv_heads=2, group=4, dtype=torch.float16)
SEEN = [60, 700]
SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "attention" / "decode_sweep.py"


def run(config, case: Case = CASE, seen: list[int] = SEEN, engine=None) -> None:
    q_pos, k_pos, valid = cache_layout(case, seen, 1)
    case = Case(**{**case.__dict__, "q_len": 1, "k_len": k_pos.shape[1]})
    q, k, v = make_qkv(case)
    engine = engine or partial(decode.lambda_decode, config=config)
    with torch.no_grad():
        run_both(engine, case, q, k, v, q_pos, k_pos, valid, valid[:, -1:], backward=False)


@pytest.mark.parametrize(
    "config",
    [
        decode.DecodeConfig(32, 4, 1, 0, splits=1),  # one launch, no partials
        decode.DecodeConfig(16, 4, 1, 0, splits=3, fused=True),  # the last split program merges
        decode.DecodeConfig(16, 4, 1, 0, splits=3, fused=False),  # a second kernel merges
        decode.DecodeConfig(16, 4, 1, 3, min_tiles=2),  # the heuristic
        # 5 partials merged 2 at a time: three loads, the last one half past the splits
        decode.DecodeConfig(16, 4, 1, 0, splits=5, merge=2),
        decode.DecodeConfig(16, 4, 1, 0, splits=5, fused=False, merge=2),
    ],
    ids=["one-split", "fused", "two-launch", "heuristic", "fused-merge-by-2", "two-launch-merge-by-2"],
)
def test_launch_modes_match_reference(config):
    run(config)
    run(config, Case(**{**CASE.__dict__, "capped": False, "softcap": 2.0, "dtype": torch.float32}))


@pytest.mark.parametrize("fixed_angles", [True, False], ids=["fixed-point", "float64"])
def test_key_angles_at_far_positions(fixed_angles):
    """Both reductions of the key angles modulo a turn stay exact a billion positions in."""
    config = decode.DecodeConfig(32, 4, 1, 0, splits=2, fixed_angles=fixed_angles)
    run(config, Case(**{**CASE.__dict__, "dtype": torch.float32}), seen=[1_000_003, 1_234_567_890])


def stored_rotated(config):
    """The decode kernel over keys stored as RingLambdaCache stores them: the window's rotated at their positions."""

    def engine(q, k, v, q_pos, k_pos, valid, spec, rope, scaling, softcap=None):
        stored = rotate_slots(k, k_pos, rope, spec.n_global)
        args = (q_pos, k_pos, valid, spec, rope, scaling, softcap)
        return decode.lambda_decode(q, stored, v, *args, rotated_from=spec.n_global, config=config)

    return engine


@pytest.mark.parametrize(
    "config",
    [decode.DecodeConfig(32, 4, 1, 0, splits=1), decode.DecodeConfig(16, 4, 1, 0, splits=3)],
    ids=["one-split", "splits"],
)
def test_window_stored_rotated_matches_reference(config):
    """Slots from `rotated_from` on are read as they are (near pairs, no global token there); the sinks
    before them rotated in the kernel under the whole rule. The reference sees the un-rotated keys."""
    run(config, engine=stored_rotated(config))
    streaming = Case(**{**CASE.__dict__, "capped": False, "softcap": 2.0, "dtype": torch.float32})
    run(config, streaming, seen=[1_000_003, 130], engine=stored_rotated(config))


def test_merge_must_be_a_power_of_two():
    with pytest.raises(ValueError, match=r"DecodeConfig.merge=3"):
        decode.decode_plan(1, 8, 320, torch.device(DEVICE), decode.DecodeConfig(32, 4, 1, 0, splits=4, merge=3))


def test_fused_merge_leaves_counters_at_zero():
    """The next call (or CUDA graph replay) starts from zero arrivals, else it would merge too early."""
    run(decode.DecodeConfig(16, 4, 1, 0, splits=5))
    counters = decode._arrivals(torch.device("cpu"), CASE.batch * CASE.kv_heads)
    assert counters.any().item() is False
    run(decode.DecodeConfig(16, 4, 1, 0, splits=5))


def test_split_plan(monkeypatch):
    monkeypatch.setattr(decode, "sm_count", lambda index: 4)  # the interpreter's "SMs", on a GPU too
    device = torch.device("cpu")
    # 320 keys are 10 tiles of 32. Fixed splits are capped by the tiles; whole tiles per split.
    assert decode.decode_plan(1, 8, 320, device, decode.DecodeConfig(32, 4, 1, 0, splits=64))[1] == 10
    assert decode.decode_plan(1, 8, 320, device, decode.DecodeConfig(32, 4, 1, 0, splits=4))[1] == 4
    assert decode.decode_plan(1, 8, 320, device, decode.DecodeConfig(32, 4, 1, 0, splits=3))[1] == 3
    # The heuristic: 16 programs per SM on the interpreter's 4 "SMs" over 8 KV heads wants 8 splits;
    # min_tiles=4 allows cdiv(10, 4) = 3; min_tiles=1 allows 8, i.e. 2 tiles each, 5 splits.
    assert decode.decode_plan(1, 8, 320, device, (32, 4, 1, 16))[1] == 3
    config, splits = decode.decode_plan(1, 8, 320, device, decode.DecodeConfig(32, 4, 1, 16, min_tiles=1))
    assert (splits, config.fused) == (5, True)
    # Never a second, partial wave: 64 programs fit, 3 x 8 (batch x KV heads) pairs get 2 splits, not 3.
    assert decode.decode_plan(3, 8, 320, device, decode.DecodeConfig(32, 4, 1, 16, min_tiles=1))[1] == 2


def _sweep_configs() -> list:
    spec = importlib.util.spec_from_file_location("decode_sweep", SWEEP)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    configs = {c for batch in sweep.BATCHES for c in sweep.candidates(batch)}
    # Warps and stages do not change what the interpreter computes: one run per tile and split choice.
    return sorted({c._replace(warps=4, stages=1) for c in configs})


@pytest.mark.parametrize("config", _sweep_configs(), ids=str)
def test_every_swept_config_matches_reference(config):
    run(config)


def test_stored_keys_rotated_in_one_kernel_launch():
    """What RingLambdaCache stores on a GPU (the Triton backend's `rotate_stored`, one rope launch per layer
    and step) is `Rotary.rotate_stored`, and its inverse gives the keys back, a million positions in."""
    from lcpatch.attention.backends import TRITON
    from lcpatch.kernels.specs import Rotary

    rope = Rotary(1.0 / (10000 ** (torch.arange(0, 64, 2, device=DEVICE) / 64.0)), 1.3)
    keys = torch.randn(2, 3, 12, 64, device=DEVICE)[:, :, 2:]  # a slice, as the ring stores a chunk's last tokens
    positions = torch.randint(0, 2_000_000, (2, 10), device=DEVICE)
    assert TRITON.verify("rotate_stored", keys, keys, keys, rope, 0.0)[0]  # the kernel runs, not the fallback
    stored = TRITON.rotate_stored(keys, positions, rope, False)
    assert torch.allclose(stored, rope.rotate_stored(keys, positions), atol=2e-5)
    assert torch.allclose(TRITON.rotate_stored(stored, positions, rope, True), keys, atol=2e-5)


def test_decode_kernel_compiles_for_hopper():
    """Every launch mode, dtype and rule of the default config compiles for sm_90 (the interpreter does not check
    Triton's typing: a tuple holding the string constexpr DOT_PREC ran here and failed to compile)."""
    compile_in_subprocess("decode_variants()")


def test_log_sum_exp_is_the_same_in_every_launch_mode():
    """`need_lse` (InfLLM's decode reads it): the merged splits give the one-split value, and a query that
    sees no key gets +inf. The one-split value against the reference: tests/test_infllm_kernels.py."""
    q_pos, k_pos, valid = cache_layout(CASE, SEEN, 1)
    case = Case(**{**CASE.__dict__, "q_len": 1, "k_len": k_pos.shape[1], "dtype": torch.float32})
    q, k, v = make_qkv(case)
    valid[1] = False
    args = (q, k, v, q_pos, k_pos, valid, case.spec, rotary(case.dim), case.dim**-0.5)
    modes = [decode.DecodeConfig(32, 4, 1, 0, splits=1)] + [
        decode.DecodeConfig(16, 4, 1, 0, splits=3, fused=fused) for fused in (True, False)
    ]
    with torch.no_grad():
        results = [decode.lambda_decode(*args, config=config, need_lse=True) for config in modes]
    (out, lse), *others = results
    assert torch.isfinite(lse[0]).all() and torch.isinf(lse[1]).all() and (lse[1] > 0).all()
    for other_out, other_lse in others:
        torch.testing.assert_close(other_lse, lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other_out[0], out[0], atol=1e-5, rtol=1e-5)
