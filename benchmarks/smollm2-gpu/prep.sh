#!/bin/bash
# Prepares the carries of the SmolLM2 GPU runs (README.md here): ignored folders only.
#   .gpu-model-a, .gpu-model-b, .gpu-whl  SmolLM2's GGUF in two parts + the gguf wheel (../shared/tools/smollm2-for-gpu.sh)
#   .gpu-books                            the Gutenberg books (the GPU machine has no ../shared)
#   .gpu-stage                            wheels the GPU image lacks (trl, datasets, the notebook kernel) and an lcpatch
#                                         wheel (the repository root is not importable there: its top-level kernels/
#                                         folder would shadow transformers' `kernels` probe)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -f .gpu-model-a/part.aa ] && [ -f .gpu-model-b/part.ab ] || bash ../shared/tools/smollm2-for-gpu.sh
for d in .gpu-books .gpu-stage; do
  grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude
done
rm -rf .gpu-books .gpu-stage && mkdir .gpu-books .gpu-stage
tar czf .gpu-books/gutenberg.tar.gz -C ../shared/data gutenberg
# Pure-Python or cp312 wheels for the GPU image (Python 3.12). Left out on purpose: debugpy and jedi (10 MB that
# ipykernel and IPython only import when present), to keep the second carry under 64 MiB.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .gpu-stage trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  nbclient nbformat jupyter_client jupyter_core ipykernel ipython ipython_pygments_lexers pyzmq tornado traitlets \
  fastjsonschema jsonschema jsonschema-specifications referencing rpds-py comm matplotlib-inline nest-asyncio \
  platformdirs pexpect ptyprocess prompt_toolkit wcwidth parso decorator stack_data asttokens executing pure_eval
# Built in isolation: the build backend comes from the index, not from whatever setuptools this Python has.
python3 -m pip wheel -q --no-deps -w .gpu-stage .
du -shc .gpu-model-a .gpu-books .gpu-model-b .gpu-whl .gpu-stage
