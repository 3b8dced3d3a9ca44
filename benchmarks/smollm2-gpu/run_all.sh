#!/bin/bash
# On the GPU machine, from a copy of the repository with the wheels installed in /tmp/site (README.md here):
# converts SmolLM2 once, then runs every job of a jobs file (default jobs/all.txt: the three SmolLM2 benchmarks and
# notebooks 02-04) side by side on the one GPU.
# Each job logs to /tmp/out/NAME.log, writes to /tmp/out/NAME/ and writes /tmp/out/done.NAME (exit status, seconds).
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 LCPATCH_SMOLLM2_GGUF=/tmp/lcm/model.gguf LCPATCH_CACHE=/tmp/lccache
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
here=$(dirname "$0")
jobs_file=${1:-$here/jobs/all.txt}
out=/tmp/out
model=/tmp/lccache/smollm2-135m-instruct
mkdir -p $out
grep -cv '^\s*\(#\|$\)' "$jobs_file" > $out/jobs  # wait.sh waits for this many done.* files
python3 -c "from lcpatch.demo.smollm2 import load_smollm2; load_smollm2()" > $out/convert.log 2>&1
while read -r name kind args; do
  case $name in '#'* | '') continue ;; esac
  case $kind in
    e2llm | logo | longpo)
      # shellcheck disable=SC2086  # args is a word list
      command=(python3 "$here/../$kind-smollm2/run.py" --model $model --data /tmp/gutenberg --out "$out/$name"
        --work "/tmp/w-$name" $args) ;;
    notebook) command=(python3 "$here/../notebooks-real/run.py" --out "$out/$name" "notebooks/$args.ipynb") ;;
    *) echo "$jobs_file: job $name has kind $kind; expected e2llm, logo, longpo or notebook" >&2; exit 2 ;;
  esac
  (
    start=$SECONDS
    "${command[@]}" > "$out/$name.log" 2>&1
    echo "rc $? after $((SECONDS - start)) s" > "$out/done.$name"
  ) &
done < "$jobs_file"
wait
