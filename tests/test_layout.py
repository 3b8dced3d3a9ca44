"""The layout rules of the README's Architecture section, checked on the source tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_folder_never_shadows_another_kernels_package():
    # Python started in the clone has the repository root first on sys.path; transformers (>= 5.25)
    # then probes and imports the Hub's `kernels` package, which the top-level kernels/ folder must not hide.
    code = (
        "import importlib.util, os\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "origin = spec.origin if spec else None\n"
        "assert origin is None or not origin.startswith(os.path.join(os.getcwd(), 'kernels')), origin\n"
        "if is_kernels_available():\n"
        "    from kernels import CUDAProperties  # the Hub package's own name\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "    num_attention_heads=2, num_key_value_heads=1, vocab_size=32))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert not (ROOT / "kernels" / "__init__.py").exists()
