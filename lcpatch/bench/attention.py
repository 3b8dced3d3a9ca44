"""Benchmark Λ attention on a CUDA GPU: lcpatch's backends (flash, Triton, the SDPA split) next to dense
causal SDPA, FlexAttention with the same Λ mask, SDPA with an explicit boolean Λ mask, and flash-attn's
plain sliding window (no global tokens: the bound a Λ kernel on flash-attention can reach).

    python -m lcpatch.bench.attention --out bench/            # prefill 16k/64k/128k + decode
    python -m lcpatch.bench.attention --out bench/ --sweep    # also time the Triton prefill block configs

Prefill: B=1, 32 query heads, 8 KV heads, D=128, n_global=4, window=4096, bf16 (forward, and
forward + backward). Decode: batch 8, one new token; lcpatch reads its bounded cache
(n_global + window + 1 slots) while SDPA reads the full 4k/32k/128k cache.
FLOP convention: 4·D per *visible* (query, key) pair per query head for the forward, 2.5x that for
the backward; only visible pairs count (causal pairs for dense SDPA, Λ pairs for the others).
The baselines attend pre-rotated q/k; lcpatch rotates un-rotated q/k itself, with the distance cap.
FlexAttention runs under torch.compile, its block mask built from block bounds (`lambda_block_mask`).
Medians of `triton.testing.do_bench`: each prefill row the median of 3 rounds, the methods taking turns;
decode also in a CUDA graph (`do_bench_cudagraph`), since an eager decode step is bound by kernel launches.
Results go to DIR/attention.json, a Markdown table on stdout and DIR/attention.png (when matplotlib is
installed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention.backends import FLASH
from ..cli.bench import benchmark_parser
from ..cli.common import MISSING, environment, pyplot
from ..kernels.lambda_reference import rotate_slots
from ..kernels.lambda_split import lambda_attention_split
from ..kernels.specs import LambdaSpec, Rotary

BATCH, Q_HEADS, KV_HEADS, DIM = 1, 32, 8, 128
N_GLOBAL, WINDOW = 4, 4096
DECODE_BATCH = 8
DTYPE = torch.bfloat16


def lambda_pairs(n: int, n_global: int = N_GLOBAL, window: int = WINDOW) -> int:
    """Visible (query, key) pairs of the Λ mask over n tokens: the window, plus globals beyond it."""
    in_window = n * (n + 1) // 2 if n <= window else window * (window + 1) // 2 + (n - window) * window
    beyond = max(0, n - window)  # queries i >= window see min(g, i - window + 1) globals outside it
    far = (
        beyond * (beyond + 1) // 2
        if beyond <= n_global
        else n_global * (n_global + 1) // 2 + (beyond - n_global) * n_global
    )
    return in_window + far


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def tflops(pairs: int, ms: float, backward: bool) -> float:
    flop = 4 * DIM * pairs * Q_HEADS * BATCH * (3.5 if backward else 1.0)
    return flop / (ms * 1e-3) / 1e12


# Prefill rows time ROUNDS rounds of PREFILL_REP_MS ms of calls, every method once per round in turn, and
# report the median round: at one round of 100 ms a 60 ms forward + backward was one call, and the bound's
# 128k forward moved between 13.9 and 17.5 ms from run to run (H100, 2026-12-07); taking turns, a drifting
# clock moves every method alike. A row slower than PREFILL_REP_MS a call (the dense and split baselines at
# 64k and 128k) gets one round: do_bench makes ~8 calls to time one, and a second is then seconds of bench.
ROUNDS = 3
PREFILL_REP_MS = 170


def bench(fn, grad_to_none=None, rep: int = 100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def bench_graph(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def sdpa(q, k, v, **kwargs):
    """SDPA with GQA; expands the KV heads where a backend refuses enable_gqa."""
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **kwargs)


def default_rotary() -> Rotary:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))
    return Rotary(inv_freq.cuda(), 1.0)


def lambda_mask_mod(n_global: int = N_GLOBAL, window: int = WINDOW):
    """The Λ mask as FlexAttention's mask_mod: causal, and a global key or one inside the window."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < n_global) | (q_idx - kv_idx < window))

    return mask_mod


def lambda_block_mask(n: int, device, n_global: int = N_GLOBAL, window: int = WINDOW, block: int = 128):
    """FlexAttention's BlockMask of `lambda_mask_mod` over n tokens, each block's kind read off its bounds.

    `create_block_mask` would evaluate the mask pair by pair: eagerly an n x n tensor (16 GiB at 128k), or
    compiled, which took 217 of the bench's 361 s on an H100 (the first compile of the process)."""
    from torch.nn.attention.flex_attention import BlockMask

    starts = torch.arange(0, n, block, device=device)
    ends = (starts + block - 1).clamp(max=n - 1)
    q0, q1, k0, k1 = starts[:, None], ends[:, None], starts[None, :], ends[None, :]
    # some pair visible: a global key at or before the last query, or a difference q - kv in [0, window)
    some = ((k0 < n_global) & (k0 <= q1)) | ((q1 >= k0) & (q0 - k1 < window))
    # every pair visible: all causal, every non-global key within the window of every query, and no padding
    whole = starts + block <= n
    full = (k1 <= q0) & ((k1 < n_global) | (q1 - k0.clamp(min=n_global) < window)) & whole[:, None] & whole[None, :]

    def ordered(blocks: torch.Tensor):
        """(counts, indices) in BlockMask's layout: each query block's kv blocks, the selected ones first."""
        indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return blocks.sum(-1, dtype=torch.int32)[None, None], indices[None, None]

    return BlockMask.from_kv_blocks(
        *ordered(some & ~full),
        *ordered(full),
        BLOCK_SIZE=block,
        mask_mod=lambda_mask_mod(n_global, window),
        seq_lengths=(n, n),
    )


class Prefill:
    """Inputs of one prefill length and one callable per method (forward output)."""

    def __init__(self, n: int):
        from torch.nn.attention.flex_attention import flex_attention

        from ..kernels.dispatch import lambda_attention

        self.n = n
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.q = torch.randn(BATCH, Q_HEADS, n, DIM, device="cuda", dtype=DTYPE, generator=gen)
        self.k = torch.randn(BATCH, KV_HEADS, n, DIM, device="cuda", dtype=DTYPE, generator=gen)
        self.v = torch.randn(BATCH, KV_HEADS, n, DIM, device="cuda", dtype=DTYPE, generator=gen)
        self.positions = torch.arange(n, device="cuda")[None]
        self.valid = torch.ones(1, n, dtype=torch.bool, device="cuda")
        self.spec = LambdaSpec(N_GLOBAL, WINDOW, WINDOW)
        self.rotary = default_rotary()
        self.block_mask = lambda_block_mask(n, "cuda")
        self.flex = torch.compile(flex_attention, dynamic=False)
        self._lambda_attention = lambda_attention
        self.seq_major = [t.transpose(1, 2).contiguous() for t in (self.q, self.k, self.v)]  # flash-attn's layout

    def methods(self) -> dict:
        q, k, v = self.q, self.k, self.v
        methods = {
            "dense causal SDPA": (lambda: sdpa(q, k, v, is_causal=True), causal_pairs(self.n)),
            "FlexAttention Λ": (
                lambda: self.flex(q, k, v, block_mask=self.block_mask, enable_gqa=True),
                lambda_pairs(self.n),
            ),
            "lcpatch Λ (Triton)": (
                lambda: self._lambda_attention(
                    q, k, v, self.positions, self.positions, self.valid, self.spec, self.rotary, DIM**-0.5
                ),
                lambda_pairs(self.n),
            ),
            "lcpatch Λ (torch: SDPA split)": (
                lambda: lambda_attention_split(
                    q, k, v, self.positions, self.positions, self.valid, self.spec, self.rotary, DIM**-0.5
                ),
                lambda_pairs(self.n),
            ),
        }
        flash_ok, _ = FLASH.available(self.q.device)
        if flash_ok:
            from flash_attn.cute import flash_attn_func

            args = (self.positions, self.positions, self.valid, self.spec, self.rotary, DIM**-0.5)
            methods["lcpatch Λ (flash)"] = (lambda: FLASH.lambda_attention(q, k, v, *args), lambda_pairs(self.n))
            qs, ks, vs = self.seq_major
            window = (WINDOW - 1, 0)
            methods["flash-attn sliding window (bound)"] = (
                lambda: flash_attn_func(qs, ks, vs, causal=True, window_size=window)[0],
                lambda_pairs(self.n, n_global=0),
            )
        if self.n <= 16384:  # an n x n boolean mask (and SDPA's use of it) only fits at this size
            i = torch.arange(self.n, device="cuda")
            mask = lambda_mask_mod()(None, None, i[:, None], i[None, :])
            methods["SDPA + bool mask Λ"] = (lambda: sdpa(q, k, v, attn_mask=mask), lambda_pairs(self.n))
        return methods

    def time(self, fn, backward: bool) -> float:
        if not backward:
            with torch.no_grad():
                return bench(fn, rep=PREFILL_REP_MS)
        leaves = [t.requires_grad_(True) for t in (self.q, self.k, self.v, *self.seq_major)]
        try:
            out = fn()
            grad = torch.randn_like(out)

            def step():
                fn().backward(grad)

            return bench(step, grad_to_none=leaves, rep=PREFILL_REP_MS)
        finally:
            for t in leaves:
                t.requires_grad_(False)
                t.grad = None


def _selected(name: str, methods: list[str] | None) -> bool:
    return methods is None or any(m.lower() in name.lower() for m in methods)


def run_prefill(lengths: list[int], backward_lengths: set[int], methods: list[str] | None = None) -> list[dict]:
    rows = []
    for n in lengths:
        started = time.perf_counter()
        case = Prefill(n)
        print(
            f"  prefill n={n} inputs and FlexAttention's block mask: {time.perf_counter() - started:.0f} s", flush=True
        )
        cells = []
        for method, (fn, pairs) in case.methods().items():
            if not _selected(method, methods):
                continue
            for backward in (False, True):
                if backward and n not in backward_lengths:
                    continue
                phase = "forward+backward" if backward else "forward"
                cells.append(({"n": n, "method": method, "phase": phase, "visible_pairs": pairs}, fn, backward))
        for round_ in range(ROUNDS):
            for row, fn, backward in cells:
                if "error" in row or (round_ and row["round_ms"][0] > PREFILL_REP_MS):
                    continue
                timed = time.perf_counter()
                try:
                    row.setdefault("round_ms", []).append(case.time(fn, backward))
                except Exception as exc:  # one baseline failing (e.g. out of memory) must not end the run
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    traceback.print_exc(file=sys.stderr)
                # Wall time of the row, compilation included: where the bench's own minutes go.
                row["seconds"] = row.get("seconds", 0.0) + time.perf_counter() - timed
                if round_ == 0:
                    print(
                        f"  prefill n={n} {row['phase']:16s} {row['method']:22s} first round ({row['seconds']:.0f} s)"
                    )
        for row, _, backward in cells:
            if "error" not in row:
                row["ms"] = statistics.median(row["round_ms"])
                row["tflops"] = tflops(row["visible_pairs"], row["ms"], backward)
            rows.append(row)
            print(
                f"  prefill n={n} {row['phase']:16s} {row['method']:22s} {row.get('ms', float('nan')):9.3f} ms"
                f" ({row['seconds']:.0f} s)",
                flush=True,
            )
        del case
        torch.cuda.empty_cache()
        print(f"  prefill n={n}: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def cache_layout(seen: int, new: int = 1):
    """LambdaCache's layout after `seen` tokens: sinks, the last `window` tokens, the new token(s)."""
    sinks = torch.arange(N_GLOBAL)
    window = torch.arange(max(0, seen - WINDOW), seen)
    positions = torch.cat((sinks, window, torch.arange(seen, seen + new)))
    valid = torch.cat((sinks < seen, window >= N_GLOBAL, torch.ones(new, dtype=torch.bool)))
    positions = positions.cuda().expand(DECODE_BATCH, -1)
    return positions[:, -new:], positions, valid.cuda().expand(DECODE_BATCH, -1)


def run_decode(contexts: list[int], methods: list[str] | None = None) -> list[dict]:
    from ..kernels.dispatch import lambda_attention

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(DECODE_BATCH, Q_HEADS, 1, DIM, device="cuda", dtype=DTYPE, generator=gen)
    spec, rotary = LambdaSpec(N_GLOBAL, WINDOW, WINDOW), default_rotary()

    def kv(length):
        shape = (DECODE_BATCH, KV_HEADS, length, DIM)
        return (torch.randn(*shape, device="cuda", dtype=DTYPE, generator=gen) for _ in range(2))

    for ctx in contexts:
        rows += _decode_context(ctx, q, kv, spec, rotary, lambda_attention, methods)
        torch.cuda.empty_cache()
    return rows


def _decode_context(ctx, q, kv, spec, rotary, lambda_attention, methods) -> list[dict]:
    q_pos, k_pos, valid = cache_layout(ctx)
    bounded = k_pos.shape[1]
    k, v = kv(ctx + 1)
    kb, vb = kv(bounded)
    # RingLambdaCache, as generate's fast path holds it: the window's keys stored rotated at their positions.
    ring = rotate_slots(kb, k_pos, rotary, N_GLOBAL)
    args = (q_pos, k_pos, valid, spec, rotary, DIM**-0.5)
    cases = {
        "SDPA, full cache": (lambda: sdpa(q, k, v), ctx + 1),
        "SDPA, bounded cache (no Λ, no RoPE)": (lambda: sdpa(q, kb, vb), bounded),
        "lcpatch Λ decode (Triton)": (
            lambda: lambda_attention(q, ring, vb, *args, keys_in_stream_order=False, rotated_from=N_GLOBAL),
            bounded,
        ),
        "lcpatch Λ decode (Triton, un-rotated cache)": (lambda: lambda_attention(q, kb, vb, *args), bounded),
    }
    rows = []
    for method, (fn, keys) in cases.items():
        if not _selected(method, methods):
            continue
        row = {"context": ctx, "method": method, "keys_read": keys}
        try:
            with torch.no_grad():
                row["ms"] = bench(fn)
                # A decode step is launch-bound when run eagerly; in a CUDA graph (as a lean generate
                # loop runs it) the time is the GPU's, which is what the bandwidth is computed from.
                row["graph_ms"] = bench_graph(fn)
            kv_bytes = 2 * DECODE_BATCH * KV_HEADS * keys * DIM * torch.finfo(DTYPE).bits // 8
            row["kv_tb_per_s"] = kv_bytes / (row["graph_ms"] * 1e-3) / 1e12
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(file=sys.stderr)
        rows.append(row)
        print(
            f"  decode ctx={ctx} {method:36s} {row.get('ms', float('nan')):8.4f} ms, "
            f"graph {row.get('graph_ms', float('nan')):8.4f} ms",
            flush=True,
        )
    return rows


def run_sweep(n: int) -> list[dict]:
    """Time the Triton prefill kernels' candidate block configs (BLOCK_M, BLOCK_N, warps, stages) at length n.
    The decode kernel's knobs have their own sweep: benchmarks/attention/decode_sweep.py."""
    prefill = importlib.import_module("lcpatch.kernels.lambda_prefill")
    candidates = {
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 4)],
        "bwd_q": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 3), (64, 64, 8, 2)],
        "bwd_kv": [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2)],
    }
    rows = []
    case = Prefill(n)
    fn = case.methods()["lcpatch Λ (Triton)"][0]
    for kernel, configs in candidates.items():
        key = (kernel, DIM, False)
        default = prefill.GPU_CONFIGS[key]
        for config in configs:
            prefill.GPU_CONFIGS[key] = config
            row = {"kernel": kernel, "n": n, "config": list(config)}
            try:
                row["ms"] = case.time(fn, backward=kernel != "fwd")
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            print(f"  sweep {kernel:7s} {config} {row.get('ms', float('nan')):9.3f} ms", flush=True)
        prefill.GPU_CONFIGS[key] = default
    del case
    torch.cuda.empty_cache()
    return rows


def _cell(rows, **match) -> str:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            if "error" in row:
                return "error"
            if "tflops" in row:
                return f"{row['ms']:.3f} ms ({row['tflops']:.0f} TFLOP/s)"
            return f"{row['ms']:.3f} / {row['graph_ms']:.3f} ms ({row['kv_tb_per_s']:.2f} TB/s)"
    return "—"


def _ms(rows, **match) -> float | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and "ms" in row:
            return row["ms"]
    return None


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"flash-attn-4 {env.get('flash_attn_4')}; {env['dtype']}; {env['date']}",
        "",
    ]
    prefill = result["prefill"]
    methods = [
        "dense causal SDPA",
        "FlexAttention Λ",
        "SDPA + bool mask Λ",
        "flash-attn sliding window (bound)",
        "lcpatch Λ (flash)",
        "lcpatch Λ (Triton)",
        "lcpatch Λ (torch: SDPA split)",
    ]
    for phase in ("forward", "forward+backward"):
        lengths = sorted({r["n"] for r in prefill if r["phase"] == phase})
        if not lengths:
            continue
        lines += [
            f"Prefill {phase} (B={BATCH}, {Q_HEADS}/{KV_HEADS} heads, D={DIM}, n_global={N_GLOBAL}, "
            f"window={WINDOW}; TFLOP/s over visible pairs only)",
            "",
            "| n | " + " | ".join(methods) + " | flash / Flex | flash / bound | Triton / Flex |",
            "|---|" + "---|" * (len(methods) + 3),
        ]
        for n in lengths:
            cells = [_cell(prefill, n=n, phase=phase, method=m) for m in methods]
            ms = {m: _ms(prefill, n=n, phase=phase, method=m) for m in methods}
            pairs = ((methods[4], methods[1]), (methods[4], methods[3]), (methods[5], methods[1]))
            ratios = [f"{ms[a] / ms[b]:.2f}x" if ms[a] and ms[b] else "—" for a, b in pairs]
            lines.append(f"| {n // 1024}k | " + " | ".join(cells + ratios) + " |")
        lines.append("")
    decode = result["decode"]
    if decode:
        names = [
            "SDPA, full cache",
            "SDPA, bounded cache (no Λ, no RoPE)",
            "lcpatch Λ decode (Triton)",
            "lcpatch Λ decode (Triton, un-rotated cache)",
        ]
        lines += [
            f"Decode (batch {DECODE_BATCH}, 1 new token; bounded cache = {N_GLOBAL} + {WINDOW} + 1 slots, its window "
            "stored rotated as generate's fast path holds it, or un-rotated as LambdaCache does): "
            "eager / CUDA-graph ms; TB/s = K and V bytes read / graph time",
            "",
            "| context | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for ctx in sorted({r["context"] for r in decode}):
            lines.append(
                f"| {ctx // 1024}k | " + " | ".join(_cell(decode, context=ctx, method=m) for m in names) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    phases = [p for p in ("forward", "forward+backward") if any(r["phase"] == p for r in result["prefill"])]
    fig, axes = plt.subplots(1, len(phases) + 1, figsize=(6 * (len(phases) + 1), 4.5))
    for ax, phase in zip(axes, phases, strict=False):
        rows = [r for r in result["prefill"] if r["phase"] == phase and "ms" in r]
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["n"], r["ms"]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms", title=f"prefill {phase}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    rows = [r for r in result["decode"] if "ms" in r]
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["context"], r["ms"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms", title=f"decode, batch {DECODE_BATCH}")
    ax.legend(fontsize=8)
    fig.suptitle(f"{result['environment']['device']}, {result['environment']['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run_cli(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print(
            "lcpatch bench attention needs a CUDA GPU (the Triton kernels and the baselines it times run "
            "there); no CUDA device is visible here.",
            file=sys.stderr,
        )
        return 2
    result = {
        "environment": environment() | {"cuda": torch.version.cuda, "dtype": str(DTYPE).removeprefix("torch.")},
        "shapes": {
            "prefill": {
                "batch": BATCH,
                "q_heads": Q_HEADS,
                "kv_heads": KV_HEADS,
                "head_dim": DIM,
                "n_global": N_GLOBAL,
                "window": WINDOW,
                "lengths": args.lengths,
            },
            "decode": {
                "batch": DECODE_BATCH,
                "q_heads": Q_HEADS,
                "kv_heads": KV_HEADS,
                "head_dim": DIM,
                "new_tokens": 1,
                "contexts": args.contexts,
                "bounded_cache": N_GLOBAL + WINDOW + 1,
            },
        },
        "flop_convention": "4*D per visible (query, key) pair per query head, forward; backward 2.5x forward; "
        "visible pairs only (causal for dense SDPA, Λ for the others)",
        "timing": f"prefill: the median of {ROUNDS} rounds, each a triton.testing.do_bench median (warmup 25 ms, rep "
        f"{PREFILL_REP_MS} ms), every method once per round in turn (round_ms); decode: do_bench median (rep 100 ms), also "
        "do_bench_cudagraph median (graph_ms), from which kv_tb_per_s is computed",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    backward = set(args.lengths if args.backward_lengths is None else args.backward_lengths)
    if args.sweep:
        result["sweep"] = run_sweep(min(args.lengths))
    result["prefill"] = run_prefill(args.lengths, backward, args.methods)
    result["decode"] = run_decode(args.contexts, args.methods)
    (args.out / "attention.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "attention.md").write_text(table)
    print(table)
    print(f"plot: {args.out / 'attention.png'}" if plot(result, args.out / "attention.png") else MISSING)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(benchmark_parser("attention").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
