#!/bin/bash
# Waits up to $1 seconds for run_all.sh's jobs, shows where each stands and packs /tmp/out into $OUT/out.tar.gz
# (one file: the device brings back only so many files per call).
end=$((SECONDS + $1))
while [ $SECONDS -lt $end ] && [ "$(ls /tmp/out/done.* 2>/dev/null | wc -l)" -lt "$(cat /tmp/out/jobs 2>/dev/null || echo 6)" ]; do
  sleep 5
done
cd /tmp/out || exit 1
for f in done.*; do echo "$f: $(cat "$f")"; done
for f in *.log; do
  echo "== $f"
  tail -c 600 "$f" | tr '\r' '\n' | tail -n 4
done
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
tar czf "$OUT/out.tar.gz" -C /tmp out
