#!/usr/bin/env bash
# Issue 19's figures in device calls of under ten minutes each, from a copy of the repository (without
# lcpatch/ and kernels/) with the lcpatch wheel on PYTHONPATH, as benchmarks/infllm-prefill/README.md sets it
# up. Writes under $OUT, at most 8 files a call (what a device call brings back).
#   bash benchmarks/decode/gpu_run.sh kernels  # the Λ decode kernel's sweep, one step's profile, the Triton prefill; ~9 min
#   bash benchmarks/decode/gpu_run.sh flash    # with flash-attn-4 on PYTHONPATH: lcpatch bench decode (backend auto,
#                                              # so flash prefill), streaming-llm, the flash prefill cells; ~9 min
#   bash benchmarks/decode/gpu_run.sh tests    # the fast path's GPU tests (captured, compiled step == eager tokens) and
#                                              # the decode kernel's launch modes at real sizes; ~4 min
# `flash` needs flash-attn-4 importable: ../../shared/tools/flash-attn4-for-gpu.sh packs it into two carries.
set -u
what=$1
here=$(dirname "$0")
source "$(dirname "$0")/../gpu_run_common.sh"
case $what in
  kernels)
    TAIL=45 run 130 python benchmarks/attention/decode_sweep.py --n-global 10 --window 8192 --budget 85 \
      --out "$OUT/decode_sweep.json"
    run 120 python "$here/profile_step.py" --out "$OUT" --length 4096 --batch 1 --compile true --steps 5
    head -28 "$OUT"/profile-*.txt
    run 270 python "$here/prefill_sweep.py" --out "$OUT" --cells triton:4096:false,triton:4096:auto,triton:8192:auto ;;
  flash)
    python -c "from flash_attn.cute import flash_attn_func" || exit 1
    # Batch 1 first: the goals are stated there (on 2026-12-07 batch 8 first left no time for batch 1).
    run 300 python -m lcpatch.bench.decode --out "$OUT/decode" --lengths 4k,32k,128k,1M --batch 1,8 \
      --methods lcpatch-fast,hf-compile --budget-s 240
    run 100 python -m lcpatch.bench.decode --out "$OUT/streaming" --recipe streaming-llm --lengths 4k,128k --batch 1 \
      --methods lcpatch-fast
    rm -f "$OUT"/*/decode.png
    run 150 python "$here/prefill_sweep.py" --out "$OUT" --cells flash:8192:auto,flash:16384:auto ;;
  tests)
    run 200 python -m pytest -q -p no:logging -m gpu tests/test_fast_decode.py | tee "$OUT/tests-fast-decode.txt"
    LCPATCH_TEST_FULL=1 run 200 python -m pytest -q -p no:logging tests/test_decode_kernel_configs.py \
      -k "not every_swept_config" | tee "$OUT/tests-decode-kernel.txt" ;;
  *)
    echo "usage: $0 kernels|flash|tests" >&2
    exit 2 ;;
esac
