"""LM-Infinite and StreamingLLM: the Λ-shaped mask and the per-pair rotary distance rule.

Both methods let a query at absolute position i see key j iff

    j <= i  and  (j < n_global  or  i - j < window)

Inside the window the rotary distance is the true one, i - j. Outside it (only the n_global
first tokens are visible there) the methods differ:

- LM-Infinite caps the distance: the pair is rotated as if it were `max_distance` apart.
- StreamingLLM re-assigns positions inside its bounded cache (sinks 0..n_global-1, then the
  window), so the query sits at cache position min(i, n_global + window - 1) and the sink at j.

Both far rules are separable (a query-side position minus a key-side position), which is what
lets the kernels fuse them into the same pass as the in-window pairs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import RecipeError, RecipeWarning
from ..fields import ATTENTION_METHODS, AUTO, SectionConfig, check_choice, check_int
from ..kernels.specs import LambdaSpec

BACKENDS = ("auto", "torch", "triton", "flash")


def _check_backend(section: str, backend: str) -> None:
    check_choice(section, "backend", backend, BACKENDS)


@ATTENTION_METHODS.register("lm-infinite")
@dataclass(frozen=True)
class LMInfinite(SectionConfig):
    """LM-Infinite (Han et al., 2023): Λ-shaped attention with a relative-distance cap.

    `window` defaults to the model's pretraining length and `max_distance` to `window`, the paper's setting.
    A `max_distance` above `window` (far pairs seen farther than any in-window pair) or above the pretraining
    length (far pairs at distances the model never saw) runs as written, with a `RecipeWarning` saying so.
    """

    n_global: int = 10
    window: int | str = AUTO
    max_distance: int | str = AUTO
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_int("attention", "n_global", self.n_global, minimum=0)
        check_int("attention", "window", self.window, minimum=1, allow_auto=True)
        check_int("attention", "max_distance", self.max_distance, minimum=1, allow_auto=True)
        _check_backend("attention", self.backend)
        if AUTO not in (self.window, self.max_distance) and self.max_distance < self.window:
            raise RecipeError(
                f"attention.max_distance ({self.max_distance}) must be >= attention.window ({self.window}): "
                "pairs outside the window must not be seen closer than pairs inside it. "
                "Use max_distance: auto (= window) or a value >= window."
            )
        if AUTO not in (self.window, self.max_distance) and self.max_distance > self.window:
            warnings.warn(
                f"attention.max_distance ({self.max_distance}) is above attention.window ({self.window}): the "
                f"global tokens outside the window are rotated as if {self.max_distance} tokens away, farther than "
                f"any pair inside the window (at most {self.window - 1} apart), so distances {self.window} to "
                f"{self.max_distance - 1} are never used. LM-Infinite caps far pairs at the window "
                "(max_distance: auto); keep a larger cap only if that gap is meant.",
                RecipeWarning,
                stacklevel=2,
            )

    def resolve(self, training_length: int) -> LMInfinite:
        if AUTO in (self.window, self.max_distance):
            window = training_length if self.window == AUTO else self.window
            max_distance = window if self.max_distance == AUTO else self.max_distance
            resolved = LMInfinite(self.n_global, window, max_distance, self.backend)
        else:
            resolved = self  # already checked (and warned about) when built
        if resolved.max_distance > training_length:
            farthest = (
                f"attention.window ({resolved.window}) and max_distance ({resolved.max_distance}) are"
                if resolved.window > training_length
                else f"attention.max_distance ({resolved.max_distance}) is"
            )
            warnings.warn(
                f"{farthest} above the model's pretraining length ({training_length}): pairs are rotated at "
                f"distances up to {resolved.max_distance}, which the model never saw in pretraining and which "
                "LM-Infinite's cap exists to avoid. Use window: auto and max_distance: auto (both the pretraining "
                f"length), or values <= {training_length}.",
                RecipeWarning,
                stacklevel=2,
            )
        return resolved

    def spec(self) -> LambdaSpec:
        return LambdaSpec(self.n_global, self.window, self.max_distance)

    def build(self, structure):
        from .lambda_attention import LambdaAttention

        return LambdaAttention(structure, self)


@ATTENTION_METHODS.register("streaming-llm")
@dataclass(frozen=True)
class StreamingLLM(SectionConfig):
    """StreamingLLM (Xiao et al., 2023): attention sinks + recent window, positions re-assigned in cache.

    `window` defaults to the pretraining length minus `n_global`, so that every in-cache
    position stays inside the trained range.
    """

    n_global: int = 4
    window: int | str = AUTO
    # Accepted so that one recipe shape serves both Λ methods; only `auto` is meaningful, since
    # StreamingLLM's distances never exceed n_global + window - 1 by construction.
    max_distance: str = AUTO
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_int("attention", "n_global", self.n_global, minimum=0)
        check_int("attention", "window", self.window, minimum=1, allow_auto=True)
        if self.max_distance != AUTO:
            raise RecipeError(
                f"attention.max_distance is {self.max_distance!r}, but streaming-llm re-assigns positions in its "
                "cache and has no distance cap; leave it out (or 'auto'), or use method: lm-infinite to cap distances."
            )
        _check_backend("attention", self.backend)

    def resolve(self, training_length: int) -> StreamingLLM:
        window = max(1, training_length - self.n_global) if self.window == AUTO else self.window
        return StreamingLLM(self.n_global, window, AUTO, self.backend)

    def spec(self) -> LambdaSpec:
        return LambdaSpec(self.n_global, self.window, None)

    def build(self, structure):
        from .lambda_attention import LambdaAttention

        return LambdaAttention(structure, self)
