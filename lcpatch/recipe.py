"""Recipes: typed, validated, YAML round-trippable descriptions of what `apply` does to a model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .attention import ATTENTION_METHODS, AttentionMethod, Dense
from .errors import RecipeError
from .fields import AUTO, SectionConfig, check_bool, check_choice, check_int, check_keys
from .rope import ROPE_SCALINGS, NoScaling, RopeScaling
from .training import TRAINING_METHODS, TrainingMethod

# `static` is the fast path without CUDA graph capture: same static-shape cache and step, run eagerly
# (CPU tests, debugging a failing capture).
DECODE_MODES = ("auto", "eager", "graph", "static")


@dataclass(frozen=True)
class GenerationOptions(SectionConfig):
    """How `generate()` feeds long prompts (`prefill_chunk` tokens per forward pass, a progress bar
    with `progress`) and how it decodes (`decode`, see `lcpatch.generation.fast_decode`; `compile`: whether
    the fast path's step goes through torch.compile first — auto: where it is captured as a CUDA graph)."""

    section: ClassVar[str] = "generation"

    prefill_chunk: int = 4096
    decode: str = "auto"
    progress: bool = False
    compile: bool | str = AUTO

    def __post_init__(self) -> None:
        check_int("generation", "prefill_chunk", self.prefill_chunk, minimum=1)
        check_choice("generation", "decode", self.decode, DECODE_MODES)
        check_bool("generation", "progress", self.progress)
        if self.compile != AUTO and not isinstance(self.compile, bool):
            raise RecipeError(
                f"generation.compile must be auto, true or false; got {self.compile!r} ({type(self.compile).__name__})."
            )


SECTIONS = ("name", "attention", "rope", "generation", "training")

# The context length of "no limit": far beyond any prompt whose keys fit in memory, yet an ordinary int wherever
# tools take it: in a JSON config, in int32 tensors and sums (2**31 - 1 has no room for `+ 1`), in RoPE code that
# compares lengths with it (unlike tokenizers' 1e30, which no tensor holds).
UNBOUNDED_CONTEXT = 2**30


@dataclass(frozen=True)
class Recipe:
    """What `lcpatch.apply` does: attention method, RoPE scaling, generation options; and, for
    `lcpatch train`, how the model is fine-tuned (`apply` ignores that section)."""

    attention: AttentionMethod = field(default_factory=Dense)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    name: str | None = None
    rope: RopeScaling = field(default_factory=NoScaling)
    training: TrainingMethod | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not isinstance(self.name, str):
            raise RecipeError(f"recipe name must be a string; got {self.name!r} ({type(self.name).__name__}).")
        if self.rope.length_dependent and not isinstance(self.attention, Dense):
            raise RecipeError(
                f"rope.scaling {self.rope.scaling} changes RoPE frequencies with each input's length, but attention "
                f"method {self.attention.method} rotates keys itself with fixed frequencies. With {self.attention.method} "
                "use rope.scaling linear, yarn, llama3 or e2llm; or attention.method dense."
            )
        if self.training is not None and self.training.method == "e2llm" and self.rope.scaling != "e2llm":
            raise RecipeError(
                f"training.method e2llm trains the positions (m + t) / g that rope.scaling e2llm reads, but "
                f"rope.scaling is {self.rope.scaling}; set rope: {{scaling: e2llm}}, or use training.method causal-lm."
            )

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping of sections; got {type(data).__name__}.")
        check_keys("recipe", data, SECTIONS)
        training = data.get("training")
        return cls(
            attention=ATTENTION_METHODS.from_dict(data.get("attention") or {}),
            generation=GenerationOptions.from_dict(data.get("generation") or {}),
            name=data.get("name"),
            rope=ROPE_SCALINGS.from_dict(data.get("rope") or {}),
            training=TRAINING_METHODS.from_dict(training) if training is not None else None,
        )

    def to_dict(self) -> dict:
        out: dict[str, Any] = {} if self.name is None else {"name": self.name}
        for section in ("attention", "rope", "generation", "training"):
            config = getattr(self, section)
            if config is not None:  # only training is optional
                out[section] = config.to_dict()
        return out

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(_yaml_error_message(source, exc)) from exc
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {source} must hold a YAML mapping of sections; got {type(data).__name__}.")
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def context_length(self, training_length: int) -> int | None:
        """The context length a model patched with this recipe (autos resolved) advertises; None: the model's own.

        - lm-infinite, streaming-llm, infllm: `UNBOUNDED_CONTEXT`. Every query attends to a bounded set of keys at
          rotary distances the model was trained on, so no length is out of range; memory is the limit (Λ caches
          are bounded, InfLLM's memory blocks grow, in CPU memory if need be).
        - dense attention with a factor scaling of RoPE (linear, dynamic, yarn, llama3, longrope; e2llm with a
          fixed g): factor × the training length, the length the scaling stretches the trained positions to.
        - dense attention with e2llm's auto g: `UNBOUNDED_CONTEXT`, since g grows with each input's length.
        - dense attention with the model's own RoPE or a new base θ (no length stated): None.
        """
        if not isinstance(self.attention, Dense):
            return UNBOUNDED_CONTEXT
        factor = getattr(self.rope, "factor", None)
        if factor is None:
            return None
        if factor == AUTO:
            return UNBOUNDED_CONTEXT
        return round(float(factor) * training_length)

    def resolve(self, training_length: int) -> Recipe:
        """Replace every `auto` value with the one derived from the model's training length."""
        attention = self.attention.resolve(training_length)
        generation = self.generation
        # A method with its own prefill chunk (InfLLM's chunk_size) decides how generate() feeds prompts.
        chunk = getattr(attention, "prefill_chunk", None)
        if chunk is not None:
            generation = dataclasses.replace(generation, prefill_chunk=chunk)
        return dataclasses.replace(
            self,
            attention=attention,
            generation=generation,
            rope=self.rope.resolve(training_length),
            training=self.training.resolve(training_length) if self.training is not None else None,
        )


def _yaml_error_message(source: str, exc: yaml.YAMLError) -> str:
    """The parser's complaint, one part a line: where (line, column, the line with a caret), what, then the fix."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:  # e.g. a character YAML does not accept: the parser's message says where
        details = str(exc).replace('"<unicode string>"', source)
    else:
        problem = getattr(exc, "problem", None) or "syntax error"
        details = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        snippet = mark.get_snippet(indent=4)
        if snippet:
            details += f"\n{snippet}"
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            details += f"\n  ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
        elif context:
            details += f"\n  ({context})"
    return (
        f"recipe {source} is not valid YAML:\n  {details}\n"
        "Fix the YAML at that place (indent with spaces, close every bracket, one `key: value` per line); "
        "`print(lcpatch.load_recipe('lm-infinite').to_yaml())` prints a valid recipe to start from."
    )


RecipeLike = str | Path | dict | Recipe


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in `recipes/`."""
    root = resources.files("lcpatch.recipes")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_recipe(spec: RecipeLike) -> Recipe:
    """A `Recipe` from a built-in name, a YAML path, a dict, or a `Recipe`."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    if isinstance(spec, (str, Path)):
        name = str(spec)
        if name in builtin_recipes():
            text = (resources.files("lcpatch.recipes") / f"{name}.yaml").read_text()
            return Recipe.from_yaml(text, source=f"'{name}' (built-in)")
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "lcpatch_recipe.yaml").is_file():  # a folder saved from a patched model
            path = path / "lcpatch_recipe.yaml"
        if path.is_file():
            return Recipe.from_yaml(path.read_text(), source=str(path))
        raise RecipeError(
            f"unknown recipe {name!r}: not a built-in recipe ({', '.join(builtin_recipes())}) "
            "and no such file. Pass a built-in name, a path to a .yaml file (or a folder saved from a patched model), "
            "a dict or a lcpatch.Recipe."
        )
    raise RecipeError(
        f"a recipe must be a built-in name, a YAML path, a dict or a lcpatch.Recipe; got {type(spec).__name__}."
    )
