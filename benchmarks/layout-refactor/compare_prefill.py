"""Old (strided) vs new prefill kernel on the GPU: bitwise equality of out/dq/dk/dv/lse, then timings."""

import oldkernels.lambda_prefill as OLD
import torch
import triton
from oldkernels.specs import LambdaSpec as OldSpec
from oldkernels.specs import Rotary as OldRotary

import lcpatch.kernels.lambda_prefill as NEW
from lcpatch.kernels.specs import LambdaSpec, Rotary

dev = "cuda"


def rotary(d, old):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=dev) / d))
    return (OldRotary if old else Rotary)(inv, 1.0)


def spec(s, old):
    return (OldSpec if old else LambdaSpec)(s.n_global, s.window, s.max_distance)


def make(B, Hkv, group, Lq, Lk, D, dtype, layout, expanded, pad, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)

    def t(H, L):
        if layout == "blhd":
            return torch.randn(B, L, H, D, generator=g, device=dev).to(dtype).transpose(1, 2)
        return torch.randn(B, H, L, D, generator=g, device=dev).to(dtype)

    q, k, v = t(Hkv * group, Lq), t(Hkv, Lk), t(Hkv, Lk)
    pos = torch.arange(Lk, device=dev)
    kpos = pos.expand(B, Lk) if expanded else pos.repeat(B, 1).contiguous()
    valid = torch.ones(B, Lk, dtype=torch.bool, device=dev)
    if pad:
        kpos = kpos.clone()
        kpos[-1] = (pos - pad).clamp_min(0)
        valid[-1, :pad] = False
    do = torch.randn(B, Lq, Hkv * group, D, generator=g, device=dev).to(dtype)
    return q, k, v, kpos[:, -Lq:], kpos, valid, do


def run(mod, old, args, s, D, softcap, backward=True):
    q, k, v, qpos, kpos, valid, do = args
    leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
    out = mod.lambda_prefill(*leaves, qpos, kpos, valid, spec(s, old), rotary(D, old), D**-0.5, softcap)
    res = {"out": out.detach()}
    if backward:
        out.backward(do)
        res.update(dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
    with torch.no_grad():
        o, lse, p = mod.prefill_forward(
            q, k, v, qpos.contiguous(), kpos.contiguous(), valid, spec(s, old), rotary(D, old), D**-0.5, softcap, True
        )
    res.update(out_nograd=o, lse=lse)
    return res


CASES = [
    (
        "bf16-d128-gqa4-pad-blhd",
        (2, 8, 4, 4097, 4097, 128, torch.bfloat16, "blhd", False, 77),
        LambdaSpec(4, 1024, 1024),
        None,
    ),
    (
        "fp16-d64-stream-softcap",
        (1, 2, 8, 2048, 2048, 64, torch.float16, "bhld", False, 0),
        LambdaSpec(4, 512, None),
        30.0,
    ),
    (
        "fp32-d64-chunk-expanded",
        (2, 2, 4, 1024, 3076, 64, torch.float32, "blhd", True, 0),
        LambdaSpec(4, 700, 1400),
        None,
    ),
    (
        "bf16-d64-chunk-prefix",
        (2, 4, 2, 1000, 3000, 64, torch.bfloat16, "blhd", False, 33),
        LambdaSpec(10, 600, 900),
        None,
    ),
]
ok = True
for name, shape, s, softcap in CASES:
    args = make(*shape)
    a = run(OLD, True, args, s, shape[5], softcap)
    b = run(NEW, False, args, s, shape[5], softcap)
    for key in a:
        same = torch.equal(a[key], b[key])
        ok &= same
        diff = "" if same else f" max abs diff {(a[key].double() - b[key].double()).abs().max().item():.3g}"
        print(f"{name:28s} {key:10s} {'identical' if same else 'DIFFERENT'}{diff}", flush=True)
print("ALL IDENTICAL" if ok else "SOME DIFFER", flush=True)


def timings(mod, old, args, s):
    """Forward and forward+backward milliseconds of one kernel module (do_bench's median)."""
    q, k, v, qpos, kpos, valid, do = args
    sp, rot = spec(s, old), rotary(128, old)
    fwd = triton.testing.do_bench(lambda: mod.lambda_prefill(q, k, v, qpos, kpos, valid, sp, rot, 128**-0.5))
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

    def step():
        for x in leaves:
            x.grad = None
        mod.lambda_prefill(*leaves, qpos, kpos, valid, sp, rot, 128**-0.5).backward(do)

    return fwd, triton.testing.do_bench(step)


# Timings: transformers' layout, bf16, D=128, 32 query heads over 8 KV heads, window 4096.
for L in (8192, 32768):
    args = make(1, 8, 4, L, L, 128, torch.bfloat16, "blhd", False, 0)
    for label, mod, old in (("old", OLD, True), ("new", NEW, False), ("old", OLD, True), ("new", NEW, False)):
        fwd, both = timings(mod, old, args, LambdaSpec(4, 4096, 4096))
        print(f"L={L:6d} {label}: forward {fwd:8.3f} ms   forward+backward {both:8.3f} ms", flush=True)
