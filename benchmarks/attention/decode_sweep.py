"""Sweep the Λ decode kernel's configs over the bounded cache, batch 1 and 8, in CUDA graphs (GPU, ~2 minutes).

    python benchmarks/attention/decode_sweep.py --out decode_sweep.json
    python benchmarks/attention/decode_sweep.py --n-global 10 --window 8192 --out decode_sweep.json  # lm-infinite on Llama-3-8B

Llama-3-8B attention (32 query heads, 8 KV heads, D=128, bf16), one new token over the bounded cache
of n_global=4 + window=4096 + 1 slots (--n-global, --window), after 32k tokens, laid out as RingLambdaCache holds it for the
fast decode path: the sinks un-rotated, the window stored rotated at its positions (`rotated_from`).
Every candidate `DecodeConfig` (keys per tile, warps, stages, split count, one launch or split + combine,
partials per merge load)
is checked against the PyTorch reference and timed with `triton.testing.do_bench_cudagraph`; TB/s = K and
V bytes / graph time. Next to them: the device's copy bandwidth (a 1 GiB copy, bytes read + written /
time), SDPA over the same cache (no Λ, no RoPE: the bound of an attention that only reads), and the
heuristic config (splits=0) set from each batch's best, timed at both batches. The knobs are
`lcpatch.kernels.lambda_decode.DecodeConfig`'s. Prints a table per batch; writes everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from lcpatch.bench.timing import copy_bandwidth
from lcpatch.kernels.lambda_decode import DECODE_CONFIG, DecodeConfig, decode_plan, lambda_decode
from lcpatch.kernels.lambda_reference import lambda_attention_reference, rotate_slots
from lcpatch.kernels.specs import LambdaSpec, Rotary

Q_HEADS, KV_HEADS, DIM, DTYPE = 32, 8, 128, torch.bfloat16
SEEN = 32768
BATCHES = (1, 8)
# Kernel variants (keys per tile, warps, stages): each is one compilation per launch mode.
VARIANTS = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2)]
# Fixed split counts per batch: 128 to 1024 programs over the 8 KV heads (the H200 has 132 SMs).
SPLITS = {1: (16, 32, 64), 8: (4, 8, 16)}
# Split + combine (two launches) only for these variants: the second launch's cost is the question.
TWO_LAUNCH = [(64, 4, 3), (32, 4, 2)]
TOLERANCE = 1.5e-2  # RMSE(kernel - reference) / RMSE(reference), the GPU tests' bfloat16 bound


def candidates(batch: int) -> list[DecodeConfig]:
    """The configs timed at `batch`, most informative first (the time budget cuts the tail)."""
    configs = [DECODE_CONFIG, DECODE_CONFIG._replace(fused=False), DECODE_CONFIG._replace(merge=1)]
    for fused, variants in ((True, VARIANTS), (False, TWO_LAUNCH)):
        for block_n, warps, stages in variants:
            for splits in SPLITS[batch]:
                configs.append(DecodeConfig(block_n, warps, stages, 0, splits=splits, fused=fused))
    # One partial per load (the merge before 2026-12-07), against the default's many.
    configs += [DecodeConfig(64, 4, 3, 0, splits=splits, merge=1) for splits in SPLITS[batch]]
    return configs


def bounded_cache(batch: int, n_global: int, window: int):
    """The cache after SEEN tokens (sinks, the last `window` tokens, the new token) and random q/k/v; k un-rotated."""
    positions = torch.cat((torch.arange(n_global), torch.arange(SEEN - window, SEEN), torch.tensor([SEEN])))
    k_pos = positions.cuda().expand(batch, -1)
    valid = torch.ones_like(k_pos, dtype=torch.bool)
    gen = torch.Generator(device="cuda").manual_seed(batch)
    q = torch.randn(batch, Q_HEADS, 1, DIM, device="cuda", dtype=DTYPE, generator=gen)
    shape = (batch, KV_HEADS, k_pos.shape[1], DIM)
    k, v = (torch.randn(*shape, device="cuda", dtype=DTYPE, generator=gen) for _ in range(2))
    return q, k, v, k_pos[:, -1:], k_pos, valid


def error_ratio(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.double(), other.double()
    return ((reference - other).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="decode_sweep.json", help="JSON file to write")
    parser.add_argument(
        "--budget", type=float, default=100.0, help="seconds after which the remaining configs are skipped"
    )
    parser.add_argument("--rep", type=int, default=20, help="ms of graph replays per timing")
    parser.add_argument("--n-global", type=int, default=4, help="sink slots of the bounded cache")
    parser.add_argument("--window", type=int, default=4096, help="window slots of the bounded cache")
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        from lcpatch.cli.common import environment

        env = environment("cuda")
    except Exception:  # the table is worth more than the metadata
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    env.update(triton=triton.__version__, command=" ".join([sys.executable, *sys.argv]))
    env["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{env['device']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}", flush=True)
    copy_tbs = copy_bandwidth(torch.device("cuda"), gib=1.0) / 1e12
    torch.cuda.empty_cache()
    print(f"copy bandwidth (1 GiB, read + write): {copy_tbs:.2f} TB/s; 80% = {0.8 * copy_tbs:.2f} TB/s", flush=True)

    spec = LambdaSpec(args.n_global, args.window, args.window)
    rotary = Rotary(1.0 / (500000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM)).cuda(), 1.0)
    inputs = {batch: bounded_cache(batch, args.n_global, args.window) for batch in BATCHES}
    stored_keys = {
        batch: rotate_slots(k, k_pos, rotary, args.n_global) for batch, (_, k, _, _, k_pos, _) in inputs.items()
    }
    rows, bounds = [], {}

    def time_config(batch: int, config: DecodeConfig, reference: torch.Tensor) -> dict:
        q, k, v, q_pos, k_pos, valid = inputs[batch]
        stored = stored_keys[batch]
        kv_bytes = 2 * k.numel() * k.element_size()
        _, splits = decode_plan(batch, KV_HEADS, k.shape[2], q.device, config)
        row = {"batch": batch, "config": config._asdict(), "splits_run": splits, "programs": batch * KV_HEADS * splits}
        try:
            with torch.no_grad():

                def fn():
                    positions = (q_pos, k_pos, valid, spec, rotary, DIM**-0.5)
                    return lambda_decode(q, stored, v, *positions, rotated_from=spec.n_global, config=config)

                row["error_ratio"] = error_ratio(reference, fn())
                if not row["error_ratio"] <= TOLERANCE:
                    row["error"] = f"output differs from the reference (error ratio {row['error_ratio']:.2e})"
                    return row
                row["us"] = do_bench_cudagraph(fn, rep=args.rep, return_mode="median") * 1e3
            row["tb_per_s"] = kv_bytes / (row["us"] * 1e-6) / 1e12
        except Exception as exc:  # e.g. out of shared memory: record it, keep sweeping
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row

    references = {}
    for batch in BATCHES:
        q, k, v, q_pos, k_pos, valid = inputs[batch]
        with torch.no_grad():
            references[batch] = lambda_attention_reference(
                q.float(), k.float(), v.float(), q_pos, k_pos, valid, spec, rotary, DIM**-0.5
            )
            graph_us = do_bench_cudagraph(partial(sdpa, q, k, v), rep=args.rep, return_mode="median") * 1e3
        bounds[batch] = {"sdpa_us": graph_us, "sdpa_tb_per_s": 2 * k.numel() * k.element_size() / graph_us / 1e6}
        print(f"batch {batch}: SDPA, same cache (no Λ, no RoPE) {graph_us:7.2f} us", flush=True)

    skipped = 0
    for batch in BATCHES:
        for config in candidates(batch):
            if time.perf_counter() - started > args.budget:
                skipped += 1
                continue
            row = time_config(batch, config, references[batch])
            rows.append(row)
            print(f"  batch {batch} {describe(row)}", flush=True)

    best = {}
    for batch in BATCHES:
        timed = [r for r in rows if r["batch"] == batch and "tb_per_s" in r]
        if timed:
            best[batch] = max(timed, key=lambda r: r["tb_per_s"])
    # The heuristic (splits=0) that would pick each batch's best split count: per_sm = programs / SMs.
    heuristic = []
    for winner in best.values():
        c = winner["config"]
        per_sm = max(1, round(winner["programs"] / env["sms"]))
        config = DecodeConfig(**{**c, "per_sm": per_sm, "min_tiles": 1, "splits": 0})
        for batch in BATCHES:
            if time.perf_counter() - started > args.budget + 15:
                skipped += 1
                continue
            row = time_config(batch, config, references[batch])
            heuristic.append(row)
            print(f"  heuristic batch {batch} {describe(row)}", flush=True)

    print_tables(rows, best, bounds, copy_tbs)
    if skipped:
        print(f"{skipped} configs skipped: over the {args.budget:.0f} s budget", flush=True)
    result = {
        "environment": env,
        "shape": {
            "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS,
            "dim": DIM,
            "dtype": str(DTYPE),
            "slots": args.n_global + args.window + 1,
        },
        "copy_tb_per_s": copy_tbs,
        "bounds": bounds,
        "rows": rows,
        "best": best,
        "heuristic": heuristic,
        "skipped": skipped,
        "seconds": time.perf_counter() - started,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def describe(row: dict) -> str:
    c = row["config"]
    angles = "" if c["fixed_angles"] else " f64-angles"
    angles += " merge=1" if c.get("merge") == 1 else ""
    knobs = f"BLOCK_N={c['block_n']:3d} w={c['warps']} s={c['stages']} splits={row['splits_run']:3d}{angles}"
    launch = "1 launch " if c["fused"] or row["splits_run"] == 1 else "2 launches"
    if c["splits"] == 0:
        launch += f" (heuristic per_sm={c['per_sm']} min_tiles={c['min_tiles']})"
    if "tb_per_s" in row:
        return f"{knobs} {launch:10s} {row['us']:8.2f} us {row['tb_per_s']:5.2f} TB/s"
    return f"{knobs} {launch:10s} {row.get('error', 'not timed')}"


def print_tables(rows, best, bounds, copy_tbs) -> None:
    for batch in BATCHES:
        print(f"\nbatch {batch}: sorted by TB/s (target {0.8 * copy_tbs:.2f} TB/s = 80% of the copy bandwidth)")
        ranked = sorted((r for r in rows if r["batch"] == batch), key=lambda r: -r.get("tb_per_s", 0.0))
        for row in ranked:
            print(f"  {describe(row)}")
        if batch in bounds:
            print(
                f"  SDPA bound (no Λ, no RoPE): {bounds[batch]['sdpa_us']:.2f} us {bounds[batch]['sdpa_tb_per_s']:.2f} TB/s"
            )
        if batch in best:
            print(f"  best: {describe(best[batch])}")


if __name__ == "__main__":
    main()
