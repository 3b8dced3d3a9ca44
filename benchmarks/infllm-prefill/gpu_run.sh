#!/usr/bin/env bash
# Issue 18's prefill figures on the GPU machine, from a copy of the repository with the lcpatch wheel
# installed on PYTHONPATH (see README.md here). Writes everything under $OUT.
#   bash benchmarks/infllm-prefill/gpu_run.sh cost LAYERS LENGTHS [TIMEOUT [RECIPES]]  # default: vanilla, lm-infinite, infllm gpu/cpu
#   bash benchmarks/infllm-prefill/gpu_run.sh tests [TIMEOUT]       # the InfLLM exactness tests at real sizes
#   bash benchmarks/infllm-prefill/gpu_run.sh profile LAYERS LENGTH
#   bash benchmarks/infllm-prefill/gpu_run.sh passkey GGUF BOOK    # lcpatch eval's seconds per 64k prompt
#   bash benchmarks/infllm-prefill/gpu_run.sh smollm2 [TIMEOUT]    # the same prompt's cost, random weights
#   bash benchmarks/infllm-prefill/gpu_run.sh all                   # the above (not passkey) in order of need, ~9 min
set -u
what=$1
shift
case $what in
  all)
    here=$(dirname "$0")
    bash "$here/gpu_run.sh" cost 32 32k,128k 240
    bash "$here/gpu_run.sh" tests 100
    bash "$here/gpu_run.sh" smollm2 60
    bash "$here/gpu_run.sh" cost 8 32k,1M 150 lm-infinite,benchmarks/cost/infllm-gpu.yaml,benchmarks/cost/infllm-cpu.yaml
    bash "$here/gpu_run.sh" profile 4 131072
    # At most 8 files come back from a device call: keep the JSON (the tables are printed above).
    rm -f "$OUT"/*/cost.png "$OUT"/smollm2-64k/cost.md "$OUT"/cost-8l-1M/cost.md ;;
  tests)
    LCPATCH_TEST_FULL=1 timeout "${1:-240}" python -m pytest -q -x tests/test_infllm_waves.py tests/test_infllm_kernels.py \
      2>&1 | tail -15 | tee "$OUT/tests.txt" ;;
  profile)
    timeout 240 python benchmarks/infllm-prefill/profile_prefill.py --layers "$1" --length "$2" \
      --out "$OUT/profile-$1l-$2.txt" > /dev/null && head -3 "$OUT/profile-$1l-$2.txt" ;;
  passkey)
    timeout 300 python -m lcpatch.cli eval --model smollm2 --gguf "$1" --recipes infllm --task passkey \
      --lengths 64k --depths 0.5 --samples 5 --text "$2" --out "$OUT/passkey-64k" --no-progress 2>&1 | tail -8 ;;
  smollm2)  # lcpatch eval's passkey prompt at 64k, timed as a cost cell: SmolLM2's shape, random weights
    timeout "${1:-120}" python -m lcpatch.cli bench --model smollm2-135m --recipes infllm --lengths 8k,64k \
      --new-tokens 8 --out "$OUT/smollm2-64k" --no-progress 2>&1 | tail -1
    cat "$OUT/smollm2-64k/cost.md" ;;
  cost)
    timeout "${3:-400}" python -m lcpatch.cli bench --model llama3-8b --layers "$1" --lengths "$2" --new-tokens 16 \
      --recipes "${4:-vanilla,lm-infinite,benchmarks/cost/infllm-gpu.yaml,benchmarks/cost/infllm-cpu.yaml}" \
      --out "$OUT/cost-$1l-${2##*,}" --no-progress 2>&1 | tail -3
    cat "$OUT/cost-$1l-${2##*,}/cost.md" ;;
esac
