"""InfLLM (Xiao et al., 2024): a training-free block memory of distant context.

Tokens that leave the local window are grouped into memory blocks of `block_size`; each block
keeps `repr_topk` representative keys. Queries are processed in execution blocks of
`exc_block_size`: each one scores the memory blocks by the inner product of its queries with
their representative keys, picks the `topk` best, and attends to the `n_init` first tokens, the
picked blocks and its local window in one softmax. Pairs outside the local window are seen at
rotary distance `n_local`, pairs inside it at their true distance. The full rule (and what differs
from the paper) is written out in `infllm_reference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..errors import RecipeError
from ..fields import ATTENTION_METHODS, AUTO, SectionConfig, check_choice, check_int
from ..kernels.specs import InfLLMSpec

OFFLOADS = ("auto", "gpu", "cpu")
BACKENDS = ("auto", "torch", "triton")

# The published configuration (Mistral / Llama-3, n_local 4096) expressed as fractions of n_local,
# so that `auto` scales it down for models trained on fewer tokens and never exceeds it.
PUBLISHED = {"n_local": 4096, "n_init": 128, "block_size": 128, "exc_block_size": 512, "repr_topk": 4}
CHUNK_PER_EXC_BLOCK = 16  # published chunk_size 8192 = 16 x exc_block_size 512


@ATTENTION_METHODS.register("infllm")
@dataclass(frozen=True)
class InfLLM(SectionConfig):
    """InfLLM block memory. `auto` values derive from the model's training length T:

    n_local = min(4096, T // 2); n_init = block_size = n_local / 32, exc_block_size = n_local / 8
    (capped at the published 128 / 128 / 512); repr_topk = min(4, block_size);
    chunk_size = 16 x exc_block_size. For T = 8192 this is the published configuration.
    """

    n_init: int | str = AUTO
    n_local: int | str = AUTO
    block_size: int | str = AUTO
    topk: int = 16
    repr_topk: int | str = AUTO
    max_cached_blocks: int = 32
    exc_block_size: int | str = AUTO
    chunk_size: int | str = AUTO
    offload: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        section = "attention"
        check_int(section, "n_init", self.n_init, minimum=0, allow_auto=True)
        for name in ("n_local", "block_size", "repr_topk", "exc_block_size", "chunk_size"):
            check_int(section, name, getattr(self, name), minimum=1, allow_auto=True)
        check_int(section, "topk", self.topk, minimum=0)
        check_int(section, "max_cached_blocks", self.max_cached_blocks, minimum=1)
        check_choice(section, "offload", self.offload, OFFLOADS)
        check_choice(section, "backend", self.backend, BACKENDS)
        self._check_pairs()

    def _check_pairs(self) -> None:
        def known(*names: str) -> bool:
            return all(getattr(self, name) != AUTO for name in names)

        if known("exc_block_size", "n_local") and self.exc_block_size > self.n_local:
            raise RecipeError(
                f"attention.exc_block_size ({self.exc_block_size}) must be <= attention.n_local ({self.n_local}): "
                f"an execution block must fit in the local window. Accepted: 1..{self.n_local}, or auto."
            )
        if known("block_size", "n_local") and self.block_size > self.n_local:
            raise RecipeError(
                f"attention.block_size ({self.block_size}) must be <= attention.n_local ({self.n_local}): a block's "
                f"own queries see all of it inside their local window. Accepted: 1..{self.n_local}, or auto."
            )
        if known("repr_topk", "block_size") and self.repr_topk > self.block_size:
            raise RecipeError(
                f"attention.repr_topk ({self.repr_topk}) must be <= attention.block_size ({self.block_size}): "
                f"representative keys are chosen among a block's keys. Accepted: 1..{self.block_size}, or auto."
            )
        if self.max_cached_blocks < self.topk:
            raise RecipeError(
                f"attention.max_cached_blocks ({self.max_cached_blocks}) must be >= attention.topk ({self.topk}): "
                f"the GPU cache must hold every selected block. Accepted: an integer >= {self.topk}."
            )
        if known("chunk_size", "exc_block_size") and self.chunk_size % self.exc_block_size:
            raise RecipeError(
                f"attention.chunk_size ({self.chunk_size}) must be a multiple of attention.exc_block_size "
                f"({self.exc_block_size}), so that chunked prefill splits execution blocks as one pass would. "
                f"Accepted: e.g. {CHUNK_PER_EXC_BLOCK * self.exc_block_size}, or auto."
            )

    def resolve(self, training_length: int) -> InfLLM:
        """Every `auto` replaced by its value for a model trained on `training_length` tokens."""
        n_local = min(PUBLISHED["n_local"], max(1, training_length // 2)) if self.n_local == AUTO else self.n_local

        def scaled(name: str, fraction: int, minimum: int) -> int:
            value = getattr(self, name)
            return max(minimum, min(PUBLISHED[name], n_local // fraction)) if value == AUTO else value

        block_size = scaled("block_size", 32, 1)
        exc_block_size = scaled("exc_block_size", 8, 1)
        repr_topk = min(PUBLISHED["repr_topk"], block_size) if self.repr_topk == AUTO else self.repr_topk
        chunk_size = CHUNK_PER_EXC_BLOCK * exc_block_size if self.chunk_size == AUTO else self.chunk_size
        return replace(
            self,
            n_init=scaled("n_init", 32, 0),
            n_local=n_local,
            block_size=block_size,
            repr_topk=repr_topk,
            exc_block_size=exc_block_size,
            chunk_size=chunk_size,
        )

    @property
    def prefill_chunk(self) -> int | str:
        """Tokens per forward pass when `generate` prefills a prompt (the paper's chunk_size)."""
        return self.chunk_size

    def spec(self) -> InfLLMSpec:
        """The per-layer rule; the recipe must be resolved."""
        names = [f.name for f in fields(InfLLMSpec)]
        unresolved = [name for name in names if getattr(self, name) == AUTO]
        if unresolved:
            raise RecipeError(f"attention.{unresolved[0]} is still 'auto'; resolve the recipe for a model first.")
        return InfLLMSpec(**{name: getattr(self, name) for name in names})

    def build(self, structure):
        """The runtime object (cache factory + attention) for one patched model."""
        from .infllm_attention import InfLLMAttention

        return InfLLMAttention(structure, self)
