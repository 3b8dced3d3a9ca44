"""Kernels compiled for sm_90 on any machine: the interpreter runs Python, not Triton's typing, so a kernel
it runs may still not compile (a return of another dtype under a constexpr branch did not; a tuple holding
a string constexpr does not). Each test runs `compile_in_subprocess`, which imports this module without
TRITON_INTERPRET (under it, `triton.jit` gives functions the compiler cannot take)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_in_subprocess(call: str) -> None:
    """Run `sm90_compile.<call>` in a fresh process without TRITON_INTERPRET; fail with its stderr."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = f"import sm90_compile; sm90_compile.{call}"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]


def compile_for_sm90(
    fn, flags: dict, pointers: dict[str, str], floats: tuple[str, ...], first_stride: str = "sq_b", **options
):
    """triton.compile `fn` for sm_90: `flags` as constexprs, the arguments before `first_stride` as pointers
    (`pointers` names their types, else *fp32), `floats` as fp32 and every other argument as i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tensors = fn.arg_names[: fn.arg_names.index(first_stride)]  # the kernels take tensors first, then strides and sizes
    signature = {}
    for name in fn.arg_names:
        if name in flags:
            signature[name] = "constexpr"
        elif name in tensors:
            signature[name] = pointers.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in floats else "i32"
    constants = {(fn.arg_names.index(name),): value for name, value in flags.items()}
    return triton.compile(
        ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32), options=options
    )


def stack_bytes(compiled) -> int:
    """The per-thread stack a compiled kernel's cubin reserves (where ptxas puts spilled registers), read by
    Triton's own cuobjdump."""
    import re
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = Path(triton.backends.nvidia.__path__[0]) / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    return int(re.search(r"STACK:(\d+)", usage.stdout).group(1))


def merge_variants(kernel: str) -> None:
    from lcpatch.kernels import lambda_flash

    fn = getattr(lambda_flash, kernel)
    tile = {"_score_fwd": "score", "_merge_fwd": "forward", "_merge_bwd": "backward"}[kernel]
    rows, warps = lambda_flash.MERGE_TILES[tile]
    scores_q = kernel != "_merge_fwd"  # the lean merge reads scores, not q: no far rule, no near keys
    rules = list(itertools.product((True, False), repeat=2)) if scores_q else [(None, None)]
    for low in (True, False):
        for capped, near in rules:
            flags = dict(HALF=64, BLOCK_M=rows, P_PAD=16, LOW=low, PRECISION="tf32" if low else "ieee")
            if scores_q:
                flags.update(CAPPED=capped, HAS_NEAR=near)
            half = "*bf16" if low else "*fp32"
            pointers = {"QPOS": "*i32", "GPOS": "*i32", "GNEAR": "*i32", "TURNS": "*fp64"}
            pointers |= {"Q": half, "QROT": half, "OUT": half, "DOUT": half, "DQW": half, "DQ": half}
            first = "sq_b" if scores_q else "sqp_b"
            try:
                compiled = compile_for_sm90(
                    fn, flags, pointers, ("q_scale", "rot_scale"), first_stride=first, num_warps=warps
                )
            except Exception as exc:
                raise AssertionError(f"{kernel} with {flags}") from exc
            # The forward tiles are sized for a 16-bit prefill (what a GPU model runs: no near keys) not to
            # spill, with Triton 3.6 and 3.9; float32 doubles every tile. The backward's 32 x 4 reserves stack
            # (456 bytes with Triton 3.6, 120 with 3.9) yet ran fastest with Triton 3.6 on an H100: 1.48 ms at
            # 64k, against 2.64 ms for 32 x 8 (16 and 0 bytes).
            if low and not near and kernel != "_merge_bwd":
                assert stack_bytes(compiled) == 0, f"{kernel} with {flags} spills: {stack_bytes(compiled)} bytes"


def decode_variants() -> None:
    from lcpatch.kernels import lambda_decode

    config = lambda_decode.DECODE_CONFIG
    # Each constexpr branch both ways (a full product is 48 compilations, minutes on two cores); the first is
    # what a bf16 decode step over the ring cache runs.
    variants = [(True, True, False, 2, True), (True, False, True, 0, False), (False, True, True, 1, True)]
    variants.append((False, False, False, 2, False))
    for variant in variants:
        _compile_decode(config, *variant)
    # The sinks' own tiles (BLOCK_S) keep 64-key tiles in registers (with 64-key sink tiles ptxas reserved 464
    # bytes of stack). The default's 128-key tiles reserve some either way (512 bytes with Triton 3.6, 728 with
    # 3.9) and still ran fastest on an H100 with Triton 3.6 (benchmarks/attention/flash-h100-2026-12-07/).
    compiled = _compile_decode(lambda_decode.DecodeConfig(64, 4, 3, 2), *variants[0])
    assert stack_bytes(compiled) == 0, f"64-key decode tiles spill: {stack_bytes(compiled)} bytes of stack"


def _compile_decode(config, low: bool, capped: bool, softcap: bool, mode: int, fixed: bool):
    from lcpatch.kernels import lambda_decode, lambda_prefill

    pointers = {"QPOS": "*i64", "KPOS": "*i64", "KVALID": "*u8", "TURNS": "*fp64", "ARRIVALS": "*i32"}
    flags = dict(HALF=64, BLOCK_M=16, ROWS=4, MERGE=16, BLOCK_N=config.block_n)
    flags["BLOCK_S"] = lambda_prefill.leading_block(config.block_n, 10)  # lm-infinite's 10 sinks
    flags.update(CAPPED=capped, SOFTCAP=softcap, MODE=mode, DOT_PREC="tf32" if low else "ieee", FIXED_ANGLES=fixed)
    half = "*bf16" if low else "*fp32"
    types = {**pointers, "Q": half, "K": half, "V": half, "OUT": half}
    try:
        return compile_for_sm90(
            lambda_decode._lambda_decode_split, flags, types, ("rot_scale", "scaling", "softcap"),
            num_warps=config.warps, num_stages=config.stages,
        )  # fmt: skip
    except Exception as exc:
        raise AssertionError(f"decode with {config}, {flags}") from exc


def prefill_forward_variants() -> None:
    """The prefill's forward kernel as a bf16 prefill of head dim 128 launches it, both far rules: it compiles,
    and runs from registers alone (its prefix tiles, BLOCK_P, sized to lm-infinite's 10 global tokens)."""
    import torch

    from lcpatch.kernels import lambda_prefill

    config = lambda_prefill.kernel_config("fwd", 128, torch.bfloat16)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    pointers = {"QPOS": "*i64", "KPOS": "*i64", "KVALID": "*u8", "BOUNDS": "*i32", "PREFIX": "*i32", "TURNS": "*fp64"}
    pointers.update({name: "*bf16" for name in ("Q", "KN", "KF", "V", "OUT")})
    for capped in (True, False):
        flags = dict(HALF=64, BLOCK_P=lambda_prefill.leading_block(config["BLOCK_N"], 10), CAPPED=capped, **config)
        flags.update(SOFTCAP=False, DOT_PREC="tf32")
        try:
            compiled = compile_for_sm90(
                lambda_prefill._lambda_fwd, flags, pointers, ("far_pos", "rot_scale", "scaling", "softcap"),
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
        except Exception as exc:
            raise AssertionError(f"prefill forward with {flags}") from exc
        assert stack_bytes(compiled) == 0, f"prefill forward with {flags} spills: {stack_bytes(compiled)} bytes"


def ring_write_variants() -> None:
    from lcpatch.kernels import ring_write

    pointers = dict(POS="*i64", VALID="*u8", TURNS="*fp64", SLOT_POS="*i64", SLOT_VALID="*u8", WRITTEN="*i64")
    for half, heads, dtype in ((32, 8, "*bf16"), (64, 8, "*fp16"), (64, 1, "*fp32"), (64, 4, "*bf16")):
        types = {**pointers, "K": dtype, "V": dtype, "KBUF": dtype, "VBUF": dtype}
        flags = dict(HALF=half, BLOCK_H=heads)
        try:
            compile_for_sm90(ring_write._ring_write_kernel, flags, types, ("scale",), first_stride="sk_b", num_warps=4)
        except Exception as exc:
            raise AssertionError(f"ring write with {flags}, {dtype}") from exc
