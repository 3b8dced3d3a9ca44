"""One measured `generate()`: prefill time, decode rate and peak memory, as `lcpatch bench` (cost) and
`lcpatch bench decode` record them."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .._compat import CACHE_ARG
from ..cli.common import VANILLA
from ..errors import LcpatchError


def resident_mib() -> float:
    """Resident set size of this process, from /proc (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


class Clock(LogitsProcessor):
    """When generate() asks for each new token's scores: the first comes right after the prefill, the others
    after each decode step. On a GPU a CUDA event is recorded in the stream (no sync: generate keeps its own
    pace, as it does for a user, and the time is when the device got there); on a CPU, the host time.
    Leaves the scores unchanged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []
        self.origin = None

    def start(self) -> None:
        self.marks = []
        self.origin = self._mark()

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, input_ids, scores):
        self.marks.append(self._mark())
        return scores

    def seconds(self) -> list[float]:
        """Seconds from `start()` to each mark."""
        if self.device.type != "cuda":
            return [mark - self.origin for mark in self.marks]
        torch.cuda.synchronize(self.device)
        return [self.origin.elapsed_time(mark) / 1000 for mark in self.marks]


class PeakMemory:
    """Peak memory growth (MiB) over a block: CUDA-allocated memory on a GPU, resident memory on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process resident set, sampled"
        self.peak_mib = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._before = self._peak = resident_mib()
            self._done = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self._peak = max(self._peak, resident_mib())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._done.set()
            self._sampler.join()
            peak = max(self._peak, resident_mib())
        self.peak_mib = peak - self._before
        return False


def measure(model, recipe, ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> dict:
    """One greedy generate() of 1 + new_tokens tokens on `ids` under `recipe` (a recipe, or VANILLA / None
    for the unpatched model): prefill time, the first decode step (where a CUDA graph is captured or a
    compiled step built), the decode rate over the steps after it, peak memory, and lcpatch's warnings."""
    from ..api import patched

    if new_tokens < 2:
        raise LcpatchError(f"new_tokens {new_tokens}: give at least 2 (the rate is timed after the first decode step).")
    clock = Clock(ids.device)
    scope = contextlib.nullcontext() if recipe in (None, VANILLA) else patched(model, recipe)
    with scope, torch.no_grad(), PeakMemory(ids.device) as memory, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clock.start()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=1 + new_tokens,
            min_new_tokens=1 + new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
    step = getattr(getattr(out, CACHE_ARG), "decode_step", None)
    del out
    times = clock.seconds()  # [first token (after prefill), after decode step 1, ...]
    rate = (len(times) - 2) / (times[-1] - times[1])
    row = {
        "prefill_s": times[0],
        "first_step_s": times[1] - times[0],
        "decode_tokens_per_s": rate,
        "decode_tokens_per_s_all": rate * ids.shape[0],
        "peak_memory_mib": memory.peak_mib,
        "memory_kind": memory.kind,
        "notes": sorted({str(w.message) for w in caught if "lcpatch" in str(w.message)}),
    }
    if step is not None:
        row["cuda_graph"] = step.graph is not None
    return row


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 20) -> float:
    """Measured device memory bandwidth in bytes/s: a device-to-device copy of `gib` GiB, counted as bytes
    read plus bytes written (how copy bandwidth is usually quoted), best of `repeats`. The decode rate's limit
    is this over the bytes a step must read."""
    if device.type != "cuda":
        raise LcpatchError(f"copy_bandwidth measures a CUDA device; got {device}.")
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del source, target
    return 2 * gib * 2**30 / best


def prefill_seconds(model, ids: torch.Tensor) -> float:
    """Wall seconds of `generate()` reading `ids` (no padding) and choosing one token: the prefill, on a CUDA
    device (synchronised before and after)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start
