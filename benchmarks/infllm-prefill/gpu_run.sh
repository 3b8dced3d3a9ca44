#!/usr/bin/env bash
# Issue 18's prefill figures on the GPU machine, from a copy of the repository with the lcpatch wheel
# installed on PYTHONPATH (see README.md here). Writes everything under $OUT.
#   bash benchmarks/infllm-prefill/gpu_run.sh cost LAYERS LENGTHS [TIMEOUT [RECIPES]]  # default: vanilla, lm-infinite, infllm gpu/cpu
#   bash benchmarks/infllm-prefill/gpu_run.sh tests [TIMEOUT]       # the InfLLM exactness tests at real sizes
#   bash benchmarks/infllm-prefill/gpu_run.sh profile LAYERS LENGTH
#   bash benchmarks/infllm-prefill/gpu_run.sh passkey GGUF BOOK    # lcpatch eval's seconds per 64k prompt
#   bash benchmarks/infllm-prefill/gpu_run.sh smollm2 [TIMEOUT]    # the same prompt's cost, random weights
#   bash benchmarks/infllm-prefill/gpu_run.sh decode-profile LAYERS LENGTH  # benchmarks/decode/profile_step.py on infllm (blocks on the GPU)
#   bash benchmarks/infllm-prefill/gpu_run.sh decode-tests [TIMEOUT]  # graph decode (infllm, lm-infinite) == eager
#   bash benchmarks/infllm-prefill/gpu_run.sh all-1                 # decode tests, 32 layers 32k/128k, exactness; ~8 min
#   bash benchmarks/infllm-prefill/gpu_run.sh all-2                 # 8 layers to 1M, profile, SmolLM2's 64k; ~7 min
# NEW (default 16) sets the tokens each cost cell generates; all-1 decodes 129, so that a memory block forms.
set -u
what=$1
shift
here=$(dirname "$0")
case $what in
  all-1)
    bash "$here/gpu_run.sh" decode-tests 90
    NEW=129 bash "$here/gpu_run.sh" cost 32 32k,128k 330
    bash "$here/gpu_run.sh" tests 160
    rm -f "$OUT"/*/cost.png ;;  # at most 8 files come back from a device call
  all-2)
    bash "$here/gpu_run.sh" cost 8 32k,1M 200 lm-infinite,benchmarks/cost/infllm-gpu.yaml,benchmarks/cost/infllm-cpu.yaml
    bash "$here/gpu_run.sh" profile 4 131072
    bash "$here/gpu_run.sh" smollm2 60
    rm -f "$OUT"/*/cost.png "$OUT"/smollm2-64k/cost.md ;;
  decode-profile)  # LAYERS LENGTH
    timeout 240 python benchmarks/decode/profile_step.py --recipe benchmarks/cost/infllm-gpu.yaml --layers "$1" \
      --length "$2" --batch 1 --out "$OUT" > /dev/null && head -8 "$OUT/profile-infllm-gpu-$2.txt" ;;
  decode-tests)
    timeout "${1:-120}" python -m pytest -q -m gpu tests/test_infllm_fast_decode.py tests/test_fast_decode.py \
      2>&1 | tail -15 | tee "$OUT/tests-decode.txt" ;;
  tests)
    LCPATCH_TEST_FULL=1 timeout "${1:-240}" python -m pytest -q -x tests/test_infllm_waves.py tests/test_infllm_kernels.py \
      tests/test_decode_kernel_configs.py -k "not every_swept_config" 2>&1 | tail -15 | tee "$OUT/tests.txt" ;;
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
    timeout "${3:-400}" python -m lcpatch.cli bench --model llama3-8b --layers "$1" --lengths "$2" --new-tokens "${NEW:-16}" \
      --recipes "${4:-vanilla,lm-infinite,benchmarks/cost/infllm-gpu.yaml,benchmarks/cost/infllm-cpu.yaml}" \
      --out "$OUT/cost-$1l-${2##*,}" --no-progress 2>&1 | tail -3
    cat "$OUT/cost-$1l-${2##*,}/cost.md" ;;
esac
