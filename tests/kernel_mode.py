"""How the kernel tests run: under Triton's interpreter on the CPU at small sizes, or, with LCPATCH_TEST_FULL=1,
compiled on a CUDA device at real sizes.

Import it before anything that imports lcpatch.kernels: @triton.jit reads TRITON_INTERPRET when a kernel
is defined, so this module sets it on import.
"""

from __future__ import annotations

import os

FULL = os.environ.get("LCPATCH_TEST_FULL") == "1"
if not FULL:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if FULL else "cpu"


def skip_module_unless_runnable(kernel=None) -> None:
    """Skip the calling test module where its mode cannot run: LCPATCH_TEST_FULL=1 without a CUDA device, or
    (interpreted) `kernel` defined before TRITON_INTERPRET=1 was set."""
    import pytest
    import torch

    if FULL and not torch.cuda.is_available():
        pytest.skip("LCPATCH_TEST_FULL=1 needs a CUDA device", allow_module_level=True)
    if not FULL and kernel is not None and not hasattr(kernel, "rewrite"):
        pytest.skip("lcpatch.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
