"""Where the flash backend's Λ time goes: one forward + backward per length under torch.profiler, next to
flash-attn-4's plain sliding window (the bound), kernel by kernel (GPU with flash-attn-4).

    python benchmarks/attention/profile_flash.py --lengths 16384 65536 --out profile.txt

Shapes as `lcpatch bench attention` (B=1, 32 query / 8 KV heads, D=128, bf16, 4 global tokens, window
4096), but q/k/v in the (B, L, H, D) memory a model's projections give (viewed as (B, H, L, D)).
Prints, per length and method, the CUDA kernels' total time over 3 steps, largest first.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lcpatch.attention.backends import FLASH
from lcpatch.kernels.specs import LambdaSpec, Rotary

Q_HEADS, KV_HEADS, DIM, N_GLOBAL, WINDOW = 32, 8, 128, 4, 4096


def inputs(n: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda heads: torch.randn(1, n, heads, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v = make(Q_HEADS), make(KV_HEADS), make(KV_HEADS)
    return [t.requires_grad_(True) for t in (q, k, v)]


def methods(n: int) -> dict:
    from flash_attn.cute import flash_attn_func

    positions = torch.arange(n, device="cuda")[None]
    valid = torch.ones(1, n, dtype=torch.bool, device="cuda")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32, device="cuda") / DIM))
    args = (positions, positions, valid, LambdaSpec(N_GLOBAL, WINDOW, WINDOW), Rotary(inv_freq, 1.0), DIM**-0.5)
    return {
        "lcpatch flash": lambda q, k, v: FLASH.lambda_attention(*(t.transpose(1, 2) for t in (q, k, v)), *args),
        "bound": lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=(WINDOW - 1, 0))[0],
    }


def profile_one(fn, leaves, steps: int = 3) -> str:
    grad = torch.randn_like(fn(*leaves))
    for _ in range(3):  # compile and warm up
        fn(*leaves).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = []
    for n in args.lengths:
        leaves = inputs(n)
        for name, fn in methods(n).items():
            report.append(f"## n={n}, {name}: forward + backward x3\n{profile_one(fn, leaves)}")
            print(report[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(report))


if __name__ == "__main__":
    main()
