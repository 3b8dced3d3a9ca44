"""Where attention runs: flash-attention, the Triton kernels or PyTorch, decided here and only here.

Modelled on flash-linear-attention's `fla/ops/backends`: a backend says whether it can run at all on
a device (`available`) and, per op, whether it takes a call's tensors (`verify(op, ...) -> (ok,
reason)`). A method's `backend` field picks one: 'torch', 'triton' or 'flash' (a BackendError if it
cannot run on the model's device), or 'auto': flash where flash-attn-4 runs (Hopper and Blackwell
GPUs), else the Triton kernels on CUDA, else PyTorch. On CPU, 'auto' runs PyTorch even under
TRITON_INTERPRET=1: the interpreter is for testing the kernels, not models.
A call a backend does not verify runs on the next one (flash, Triton, PyTorch), with a one-time
warning that says why. Decode steps under 'flash' run the Triton decode kernel, by design.

The ops (each backend has them under these names, with the reference's arguments):
- `lambda_attention`: Λ attention, see `kernels/lambda_reference.py`;
- `rotate_stored`: keys rotated for a cache that stores them so (or back), see `Rotary.rotate_stored`;
- `write_ring_token`: one decode token per row stored in RingLambdaCache's buffers, see
  `RingLambdaCacheLayer._write` (False: the backend leaves it to that PyTorch code);
- `block_attention`: the function InfLLM computes each execution block with, see
  `infllm_reference.execution_block_attention`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..errors import BackendError
from ..kernels.infllm_split import execution_block_attention_split
from ..kernels.lambda_reference import lambda_attention_reference, rotate_slots
from ..kernels.lambda_split import lambda_attention_split
from ..kernels.specs import LambdaSpec, Rotary
from .infllm_reference import execution_block_attention

Verdict = tuple[bool, str | None]

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def sdpa_takes(softcap: float | None, dropout: float, otherwise: str) -> bool:
    """Whether the SDPA engines can compute a call; if not, a one-time warning saying why and what runs instead."""
    if softcap is None and dropout == 0.0:
        return True
    reason = f"logit softcap {softcap}" if softcap is not None else f"attention dropout {dropout}"
    warn_once(f"lcpatch: {reason} is not supported by SDPA; {otherwise}.")
    return False


class TorchBackend:
    """PyTorch on any device and tensors: Λ attention and InfLLM's execution blocks split into SDPA calls
    (`kernels/lambda_split.py`, `kernels/infllm_split.py`), or the references for what SDPA cannot
    express (logit softcap, attention dropout)."""

    def lambda_attention(
        self, *args, softcap=None, dropout=0.0, keys_in_stream_order=True, rotated_from=None
    ) -> torch.Tensor:
        if sdpa_takes(softcap, dropout, "Λ attention runs the (slow) per-pair reference"):
            query, key, value, query_positions, key_positions, key_valid, spec, rotary, scaling = args
            key = rotate_slots(key, key_positions, rotary, rotated_from, inverse=True)
            args = (query, key, value, query_positions, key_positions, key_valid, spec, rotary, scaling)
            return lambda_attention_split(*args, keys_in_stream_order=keys_in_stream_order)
        return lambda_attention_reference(
            *args,
            softcap=softcap,
            dropout=dropout,
            keys_in_stream_order=keys_in_stream_order,
            rotated_from=rotated_from,
        )

    def block_attention(self, query, key, value, rotary: Rotary, dropout: float) -> Callable:
        return torch_block_attention

    def infllm_decode_step(self, query, key, value, rotary: Rotary, dropout: float) -> Callable | None:
        """The engine of `infllm_decode.infllm_decode_step`; None: the reference's step runs instead."""
        return None

    def rotate_stored(self, keys, positions, rotary: Rotary, inverse: bool) -> torch.Tensor:
        return rotary.rotate_stored(keys, positions, inverse).to(keys.dtype)

    def write_ring_token(self, *args) -> bool:
        return False  # the cache's own PyTorch write runs


class TritonBackend:
    """lcpatch's Triton kernels (`lcpatch.kernels`): CUDA devices, or CPU under TRITON_INTERPRET=1."""

    def available(self, device: torch.device) -> Verdict:
        """Whether the kernels can run for a model on `device` (CUDA only: see the module docstring)."""
        if device.type != "cuda":
            return False, f"tensors are on {device.type}, and the Triton kernels run on CUDA devices only"
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "the `triton` package is not installed"
        try:
            from ..kernels import dispatch  # noqa: F401  (imports triton and the kernels)
        except ImportError as exc:
            return False, f"lcpatch.kernels could not be imported ({exc})"
        return True, None

    def verify(self, op: str, query, key, value, rotary: Rotary, dropout: float, keys_in_stream_order=True) -> Verdict:
        """Whether the kernels of `op` take these tensors; the reason names what they do not support."""
        from ..kernels.dispatch import DECODE_MAX_ROWS, query_rows, takes_decode
        from ..kernels.utils import DTYPES, HEAD_DIMS, interpreting

        dim = query.shape[-1]
        if dim not in HEAD_DIMS or key.shape[-1] != dim or value.shape[-1] != dim:
            return False, f"head dims q/k/v {dim}/{key.shape[-1]}/{value.shape[-1]} (kernels: {HEAD_DIMS}, all equal)"
        if rotary.dim != dim:
            return False, f"partial rotary ({rotary.dim} of {dim} dims rotated)"
        if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
            return False, f"dtypes q/k/v {query.dtype}/{key.dtype}/{value.dtype} (kernels: one of fp16, bf16, fp32)"
        if dropout > 0.0:
            return False, f"attention dropout {dropout}"
        if query.device.type != "cuda" and not interpreting():
            return False, f"tensors on {query.device.type} (set TRITON_INTERPRET=1 to run the kernels on CPU)"
        if op == "lambda_attention" and not (keys_in_stream_order or takes_decode(query, key, value)):
            rows = f"{query_rows(query, key)} query rows per KV head"
            return False, f"{rows} over keys out of stream order (decode kernel: <= {DECODE_MAX_ROWS})"
        return True, None

    def lambda_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
        key_valid: torch.Tensor,
        spec: LambdaSpec,
        rotary: Rotary,
        scaling: float,
        softcap: float | None = None,
        dropout: float = 0.0,
        keys_in_stream_order: bool = True,
        rotated_from: int | None = None,
    ) -> torch.Tensor:
        """The reference's `lambda_attention_reference`, on the kernels where they take the tensors."""
        args = (query, key, value, query_positions, key_positions, key_valid, spec, rotary, scaling)
        order = dict(keys_in_stream_order=keys_in_stream_order, rotated_from=rotated_from)
        ok, reason = self.verify("lambda_attention", query, key, value, rotary, dropout, keys_in_stream_order)
        if not ok:
            warn_once(f"lcpatch.kernels: {reason} is not supported by the Triton kernels; using PyTorch.")
            return TORCH.lambda_attention(*args, softcap=softcap, dropout=dropout, **order)
        from ..kernels.dispatch import lambda_attention

        return lambda_attention(*args, softcap=softcap, **order)

    def block_attention(self, query, key, value, rotary: Rotary, dropout: float) -> Callable:
        ok, reason = self.verify("block_attention", query, key, value, rotary, dropout)
        if not ok:
            warn_once(f"lcpatch.kernels: {reason} is not supported by the InfLLM kernel; using PyTorch.")
            return TORCH.block_attention(query, key, value, rotary, dropout)
        from ..kernels.infllm import execution_block_attention_triton

        return execution_block_attention_triton

    def infllm_decode_step(self, query, key, value, rotary: Rotary, dropout: float) -> Callable | None:
        if not self.verify("block_attention", query, key, value, rotary, dropout)[0]:
            return None  # block_attention says why, once
        from ..kernels.infllm import decode_step_triton

        return decode_step_triton

    def rotate_stored(self, keys, positions, rotary: Rotary, inverse: bool) -> torch.Tensor:
        """`Rotary.rotate_stored` in one launch (kernels/rope.py), where the kernels take the keys."""
        ok, _ = self.verify("rotate_stored", keys, keys, keys, rotary, 0.0)
        if not ok:
            return TORCH.rotate_stored(keys, positions, rotary, inverse)
        from ..kernels.rope import frequency_turns, rope

        turns = frequency_turns(rotary.inv_freq, keys.device)
        scale = 1.0 / rotary.scale if inverse else rotary.scale
        return rope(keys, positions, turns, scale, inverse=inverse)[0]

    def write_ring_token(
        self, key, value, positions, valid, key_buffer, value_buffer, slot_positions, slot_valid, written,
        n_global: int, rotary: Rotary,
    ) -> bool:  # fmt: skip
        """The ring cache's write of one token per row in one launch (kernels/ring_write.py): the bits its
        PyTorch write stores with `rotate_stored` above. False, nothing written, where the kernels do not take
        the keys."""
        if not self.verify("write_ring_token", key, key, value, rotary, 0.0)[0]:
            return False
        from ..kernels.ring_write import write_ring_token
        from ..kernels.rope import frequency_turns

        buffers = (key_buffer, value_buffer, slot_positions, slot_valid, written)
        turns = frequency_turns(rotary.inv_freq, key.device)
        write_ring_token(key, value, positions, valid, *buffers, n_global, turns, rotary.scale)
        return True


class FlashBackend:
    """flash-attn-4 for Λ prefill and training (`kernels/lambda_flash.py`): the window part in one
    flash-attention call, the global keys merged by a Triton kernel. Decode steps, InfLLM and the calls
    flash-attention cannot take run on the Triton kernels."""

    def available(self, device: torch.device) -> Verdict:
        ok, reason = TRITON.available(device)
        if not ok:
            return ok, reason
        try:  # the engine calls flash-attention's forward and backward functions (`kernels/lambda_flash.py`)
            from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # noqa: F401
        except ImportError as exc:
            return False, f"flash-attn-4 cannot be imported ({exc})"
        major, minor = torch.cuda.get_device_capability(device)
        if major not in FLASH_ARCHS:
            return (
                False,
                f"flash-attn-4 runs on Hopper and Blackwell GPUs; this one has compute capability {major}.{minor}",
            )
        return True, None

    def verify(self, query, key, value, rotary: Rotary, softcap, dropout: float, keys_in_stream_order: bool) -> Verdict:
        """Whether the flash engine takes these tensors (before looking at their positions)."""
        dim = query.shape[-1]
        if dim not in FLASH_HEAD_DIMS or key.shape[-1] != dim or value.shape[-1] != dim:
            return (
                False,
                f"head dims q/k/v {dim}/{key.shape[-1]}/{value.shape[-1]} (flash engine: {FLASH_HEAD_DIMS}, all equal)",
            )
        if rotary.dim != dim:
            return False, f"partial rotary ({rotary.dim} of {dim} dims rotated)"
        if query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
            return False, f"dtypes q/k/v {query.dtype}/{key.dtype}/{value.dtype} (flash-attention: fp16 or bf16)"
        if softcap is not None:
            return False, f"logit softcap {softcap}"
        if dropout > 0.0:
            return False, f"attention dropout {dropout}"
        if not keys_in_stream_order:
            return False, "keys out of stream order (a ring buffer)"
        return True, None

    def lambda_attention(
        self, query, key, value, query_positions, key_positions, key_valid, spec, rotary, scaling,
        softcap=None, dropout=0.0, keys_in_stream_order=True, rotated_from=None,
    ) -> torch.Tensor:  # fmt: skip
        """The reference's `lambda_attention_reference`, on flash-attention where it takes the call."""
        from ..kernels.dispatch import takes_decode  # here, as the Triton backend's: triton is an extra
        from ..kernels.lambda_flash import lambda_attention_flash, layout

        args = (query, key, value, query_positions, key_positions, key_valid, spec, rotary, scaling)
        order = dict(keys_in_stream_order=keys_in_stream_order, rotated_from=rotated_from)
        if takes_decode(query, key, value):  # a few rows over the cache: the split-KV decode kernel's work
            return TRITON.lambda_attention(*args, softcap=softcap, dropout=dropout, **order)
        key = rotate_slots(key, key_positions, rotary, rotated_from, inverse=True)
        args = (query, key, value, query_positions, key_positions, key_valid, spec, rotary, scaling)
        ok, reason = self.verify(query, key, value, rotary, softcap, dropout, keys_in_stream_order)
        keys = layout(query_positions, key_positions, key_valid, spec) if ok else None
        if keys is not None and keys.problem is not None:
            ok, reason = False, keys.problem
        if not ok:
            warn_once(f"lcpatch: {reason} is not supported by the flash-attention backend; using the Triton kernels.")
            return TRITON.lambda_attention(
                *args, softcap=softcap, dropout=dropout, keys_in_stream_order=keys_in_stream_order
            )
        return lambda_attention_flash(*args, keys)

    def block_attention(self, query, key, value, rotary: Rotary, dropout: float) -> Callable:
        return TRITON.block_attention(query, key, value, rotary, dropout)

    def infllm_decode_step(self, query, key, value, rotary: Rotary, dropout: float) -> Callable | None:
        return TRITON.infllm_decode_step(query, key, value, rotary, dropout)

    def rotate_stored(self, keys, positions, rotary: Rotary, inverse: bool) -> torch.Tensor:
        return TRITON.rotate_stored(keys, positions, rotary, inverse)

    def write_ring_token(self, *args) -> bool:
        return TRITON.write_ring_token(*args)


def torch_block_attention(query, query_positions, query_valid, near, memory, spec, rotary, scaling, softcap, dropout):
    """InfLLM's execution block on SDPA (`kernels/infllm_split.py`), or the reference where SDPA cannot go."""
    if sdpa_takes(softcap, dropout, "InfLLM attention runs the (slow) reference"):
        return execution_block_attention_split(query, query_positions, query_valid, near, memory, spec, rotary, scaling)
    return execution_block_attention(
        query, query_positions, query_valid, near, memory, spec, rotary, scaling, softcap, dropout
    )


TORCH = TorchBackend()
TRITON = TritonBackend()
FLASH = FlashBackend()
FLASH_ARCHS = (9, 10, 11)  # compute capability majors flash-attn-4 compiles for: Hopper, Blackwell
FLASH_HEAD_DIMS = (64, 128)
FLASH_INSTALL = (
    'pip install "lcpatch[flash]" (flash-attn-4, for Hopper and Blackwell GPUs; on older GPUs use '
    "backend: triton, which needs no flash-attn)"
)


def select_backend(requested: str, device: torch.device) -> TorchBackend | TritonBackend | FlashBackend:
    """The backend for attention on `device` under a method's `backend` field ('auto', 'torch', 'triton', 'flash')."""
    if requested == "torch":
        return TORCH
    if requested in ("auto", "flash"):
        ok, reason = FLASH.available(device)
        if ok:
            return FLASH
        if requested == "flash":
            raise BackendError(
                f"attention.backend is 'flash' but {reason}. Install it with {FLASH_INSTALL}; "
                "or use backend: auto (the fastest backend that runs here)."
            )
    ok, reason = TRITON.available(device)
    if requested == "triton" and not ok:
        raise BackendError(
            f"attention.backend is 'triton' but {reason}. Use backend: auto (kernels where possible) or torch."
        )
    return TRITON if ok else TORCH
