#!/usr/bin/env bash
# Issue 20's figures in device calls of under ten minutes each, from a copy of the repository (without
# lcpatch/ and kernels/) with the lcpatch wheel and flash-attn-4 on PYTHONPATH (as benchmarks/infllm-prefill/
# README.md sets it up; ../../shared/tools/flash-attn4-for-gpu.sh packs flash-attn-4 into two carries).
# Writes under $OUT, at most 8 files a call (what a device call brings back).
#   bash benchmarks/attention/gpu_run.sh decode  # the decode kernel's sweep (no flash-attn needed); ~2 min
#   bash benchmarks/attention/gpu_run.sh bench   # the whole `lcpatch bench attention`, timed as a new user runs
#                                                # it (empty compile caches); ~4-6 min
#   bash benchmarks/attention/gpu_run.sh engine  # flash / bound / Flex twice more, the merge tiles, a 64k
#                                                # profile and the flash engine's GPU tests; ~5 min
set -u
what=$1
source "$(dirname "$0")/../gpu_run_common.sh"
case $what in
  decode)
    TAIL=45 run 150 python benchmarks/attention/decode_sweep.py --budget 70 --out "$OUT/decode_sweep.json" ;;
  bench)
    python -c "from flash_attn.cute import flash_attn_func" || exit 1
    start=$(date +%s)
    TAIL=60 run 570 python -m lcpatch.bench.attention --out "$OUT/bench"
    echo "whole bench: $(( $(date +%s) - start )) s"
    rm -f "$OUT/bench/attention.png" ;;
  engine)
    python -c "from flash_attn.cute import flash_attn_func" || exit 1
    for round in 1 2; do
      run 120 python -m lcpatch.bench.attention --out "$OUT/engine-$round" --lengths 16384 65536 131072 --contexts \
        --methods "lcpatch Λ (flash)" "sliding window (bound)" FlexAttention
      rm -f "$OUT/engine-$round/attention.png" "$OUT/engine-$round/attention.md"
    done
    TAIL=20 run 100 python benchmarks/attention/merge_sweep.py --lengths 65536 --out "$OUT/merge_sweep.json"
    run 90 python benchmarks/attention/profile_flash.py --lengths 65536 --out "$OUT/profile-64k.txt"
    LCPATCH_TEST_FULL=1 run 200 python -m pytest -q -x -k "not compile" tests/test_lambda_flash.py \
      | tee "$OUT/gpu_tests.log" ;;
  *)
    echo "usage: $0 decode|bench|engine" >&2
    exit 2 ;;
esac
