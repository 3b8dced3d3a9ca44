"""Time the flash engine's merge kernels over their tiles (query rows, warps per program) (GPU, ~1 minute).

    python benchmarks/attention/merge_sweep.py --lengths 16384 65536 --out merge_sweep.json

Shapes as `lcpatch bench attention` (B=1, 32 query / 8 KV heads, D=128, bf16, 4 global tokens, window
4096), a plain prefill. Each tile of `lcpatch.kernels.lambda_flash.MERGE_TILES` is checked against the
default's result (RMSE ratio) and timed with `triton.testing.do_bench`. GB/s counts the bytes a kernel
must move: score q read and written rotated; forward out read and written; backward q, out, dout and
flash-attention's dq read, the query's dq written (bf16).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
from decode_sweep import error_ratio  # the sibling sweep's RMSE ratio (this folder is on sys.path)
from triton.testing import do_bench

from lcpatch.kernels import lambda_flash
from lcpatch.kernels.lambda_flash import global_keys, layout, merge_backward, merge_forward, score_forward
from lcpatch.kernels.specs import LambdaSpec, Rotary

Q_HEADS, KV_HEADS, DIM, N_GLOBAL, WINDOW = 32, 8, 128, 4, 4096
TILES = [(32, 4), (32, 8), (64, 4), (64, 8), (128, 4), (128, 8)]


def problem(n: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    randn = partial(torch.randn, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = randn(1, Q_HEADS, n, DIM), randn(1, KV_HEADS, n, DIM), randn(1, KV_HEADS, n, DIM)
    positions = torch.arange(n, device="cuda")[None]
    valid = torch.ones(1, n, dtype=torch.bool, device="cuda")
    spec = LambdaSpec(N_GLOBAL, WINDOW, WINDOW)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32, device="cuda") / DIM))
    rotary = Rotary(inv_freq, 1.0)
    keys = layout(positions, positions, valid, spec)
    g = global_keys(k, v, positions, valid, keys, spec, rotary)
    out = randn(1, n, Q_HEADS, DIM)
    lse = torch.randn(1, Q_HEADS, n, device="cuda", generator=gen) + 8.0
    dout, dq_window = randn(1, n, Q_HEADS, DIM), randn(1, n, Q_HEADS, DIM)
    return q, keys, g, out, lse, dout, dq_window, spec, rotary


def sweep(n: int) -> list[dict]:
    q, keys, g, out, lse, dout, dq_window, spec, rotary = problem(n)
    common = (g, keys, spec, rotary, DIM**-0.5)

    _, scores = score_forward(q, keys.query_positions, *common)

    def score():
        return score_forward(q, keys.query_positions, *common)[0]

    def forward():
        merged, merged_lse = out.clone(), lse.clone()
        merge_forward(scores, keys.query_positions, merged, merged_lse, g, keys, spec)
        return merged

    def backward():
        return merge_backward(q, keys.query_positions, out, lse, dout, dq_window, *common)[0]

    element = q.element_size()
    moved = {"score": 2, "forward": 2, "backward": 5}
    moved = {kernel: units * out.numel() * element for kernel, units in moved.items()}
    # the forward is timed in place, merging again and again into one copy: the same work each time
    timed_out, timed_lse = out.clone(), lse.clone()
    timed = {
        "score": score,
        "forward": lambda: merge_forward(scores, keys.query_positions, timed_out, timed_lse, g, keys, spec),
        "backward": backward,
    }
    rows = []
    default = dict(lambda_flash.MERGE_TILES)
    for kernel, run in (("score", score), ("forward", forward), ("backward", backward)):
        reference = run()
        for tile in TILES:
            lambda_flash.MERGE_TILES[kernel] = tile
            try:
                error = error_ratio(reference, run())
                ms = do_bench(timed[kernel], warmup=10, rep=100, return_mode="median")
            except Exception as exc:  # a tile that does not compile (registers, shared memory) is a result
                rows.append({"n": n, "kernel": kernel, "tile": tile, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"  n={n:>6} {kernel:<8} rows={tile[0]:>3} warps={tile[1]} failed: {rows[-1]['error'][:120]}")
                continue
            finally:
                lambda_flash.MERGE_TILES.update(default)
            gbs = moved[kernel] / (ms * 1e-3) / 1e9
            row = {"n": n, "kernel": kernel, "tile": tile, "default": tile == default[kernel], "ms": ms}
            row |= {"GB/s": gbs, "rmse_ratio": error}
            rows.append(row)
            print(
                f"  n={n:>6} {kernel:<8} rows={tile[0]:>3} warps={tile[1]} {ms:7.3f} ms {gbs:6.0f} GB/s err {error:.1e}"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--out", default="merge_sweep.json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    rows = [row for n in args.lengths for row in sweep(n)]
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "tiles": rows}, f, indent=1)


if __name__ == "__main__":
    main()
