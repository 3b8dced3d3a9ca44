"""Choose the compute backend for Λ attention: Triton kernels on CUDA, the PyTorch reference elsewhere."""

from __future__ import annotations

import torch

from ..errors import BackendError


def triton_available(device: torch.device) -> str | None:
    """None if the Triton kernels can run on `device`, else the reason they cannot."""
    if device.type != "cuda":
        return f"tensors are on {device.type}, and the Triton kernels run on CUDA devices only"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the `triton` package is not installed"
    try:
        from ..kernels import dispatch  # noqa: F401  (imports triton and the kernels)
    except ImportError as exc:
        return f"lcpatch.kernels could not be imported ({exc})"
    return None


def select_backend(requested: str, device: torch.device) -> str:
    """'torch' or 'triton' for a tensor on `device`; raise if 'triton' was forced and cannot run."""
    if requested == "torch":
        return "torch"
    reason = triton_available(device)
    if requested == "triton" and reason is not None:
        raise BackendError(
            f"attention.backend is 'triton' but {reason}. Use backend: auto (kernels where possible) or torch."
        )
    return "triton" if reason is None else "torch"
