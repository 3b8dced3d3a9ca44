"""Cost against context length, per recipe: prefill time, decode tokens/s and peak memory of `generate()`.

    lcpatch bench --model llama3-8b --recipes vanilla,lm-infinite,infllm --lengths 4k,32k,128k --out DIR
    lcpatch bench --model path/to/model --recipes vanilla,my-recipe.yaml --lengths 4k,16k --batch 1,8 --out DIR
    lcpatch bench --model smollm2-135m --layers 4 --lengths 1k,2k --device cpu --out DIR   (a quick CPU look)

--model is a local model folder (its weights), a config.json (random weights), or a shape preset with
random weights (cost does not depend on the weights): {presets}. --layers N keeps the first N layers of a
random-weight model, for quick runs. The prompt is random token ids, the same for every recipe.

Each cell is one `model.generate()` of 1 + --new-tokens tokens, after one untimed call per recipe and batch
(kernel compilation, allocator growth): prefill is the time from the call to the first token's logits,
decode the rate of the tokens after the first decode step (per sequence; ×batch for the aggregate), peak
memory the growth
of CUDA-allocated memory (on a GPU) or of the process's resident memory (on a CPU, sampled every 2 ms)
over what the model held before the call. A cell that runs out of memory is recorded as such and the
longer lengths of that recipe and batch are skipped. Writes DIR/cost.json (rewritten after every cell),
DIR/cost.md and DIR/cost.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import platform
import threading
import time
import warnings
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ._compat import CACHE_ARG
from .demo import VANILLA, parse_recipes, resolve_device, resolve_dtype
from .errors import LcpatchError, run_reporting_errors
from .eval.run import parse_lengths
from .eval.soak import resident_mib
from .plotting import MISSING, pyplot

logger = logging.getLogger(__name__)

_LLAMA3_ROPE = {"rope_type": "default", "rope_theta": 500000.0}
# Shapes of public checkpoints, instantiated with random weights: cost needs only the shape.
PRESETS = {
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_parameters=_LLAMA3_ROPE,
    ),
    "llama3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_parameters=_LLAMA3_ROPE,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
    ),
    # The shape of the test models (tests/tiny_models.py): scripts check themselves on a CPU with it.
    "tiny": dict(
        model_type="llama",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
}
__doc__ = __doc__.format(presets=", ".join(PRESETS))
RESULTS = "cost.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help=f"a model folder, a config.json, or a preset: {', '.join(PRESETS)}"
    )
    parser.add_argument("--layers", type=int, help="random-weight models only: keep the first N decoder layers")
    parser.add_argument("--recipes", default=f"{VANILLA},lm-infinite", help=f"'{VANILLA}', recipe names or YAML paths")
    parser.add_argument("--lengths", default="4k,16k,64k", help="prompt lengths, e.g. '4k,16k,64k' (k = 1024)")
    parser.add_argument("--batch", default="1", help="batch sizes, e.g. '1,8'")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed after the first token")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for cost.json, cost.md and cost.png")
    parser.add_argument("--no-progress", action="store_true", help="no per-cell log lines")


def parse_batches(spec: str) -> list[int]:
    try:
        batches = [int(part) for part in spec.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or len(set(batches)) != len(batches):
        raise LcpatchError(f"--batch: {spec!r} is not a list of distinct positive batch sizes; give e.g. '1,8'.")
    return batches


def preset_config(name: str):
    """The transformers config of a shape preset."""
    from transformers import AutoConfig

    settings = dict(PRESETS[name])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def load_model(name: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, description, weights in bytes) from a preset, a config.json or a model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(name).expanduser()
    if name in PRESETS:
        config = preset_config(name)
        described = f"{name} shape, random weights"
    elif path.is_file() and path.suffix == ".json":
        config = AutoConfig.from_pretrained(path)
        described = f"{path.name} ({config.model_type}), random weights"
    elif (path / "config.json").is_file():
        if layers is not None:
            raise LcpatchError(f"--layers applies to random-weight models only; {name} is a model folder with weights.")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        return model, f"{path.name} ({model.config.model_type})", _weight_bytes(model)
    else:
        raise LcpatchError(
            f"--model {name!r} is neither a preset ({', '.join(PRESETS)}), a config.json nor a folder with a "
            "config.json; give one of those."
        )
    if layers is not None:
        if not 1 <= layers <= config.num_hidden_layers:
            raise LcpatchError(f"--layers {layers}: the model has {config.num_hidden_layers} layers; give 1..that.")
        config.num_hidden_layers = layers
        described += f", first {layers} layers"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model, described, _weight_bytes(model)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Clock(LogitsProcessor):
    """Times at which generate() asks for each new token's scores (after a device sync): the first comes
    right after the prefill, the others after each decode step. Leaves the scores unchanged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


class PeakMemory:
    """Peak memory growth (MiB) over a block: CUDA-allocated memory on a GPU, resident memory on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process resident set, sampled"
        self.peak_mib = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._before = self._peak = resident_mib()
            self._done = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self._peak = max(self._peak, resident_mib())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._done.set()
            self._sampler.join()
            peak = max(self._peak, resident_mib())
        self.peak_mib = peak - self._before
        return False


def measure(model, recipe, ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> dict:
    """One greedy generate() of 1 + new_tokens tokens on `ids` under `recipe` (a recipe, or VANILLA / None
    for the unpatched model): prefill time, the first decode step (where a CUDA graph is captured or a
    compiled step built), the decode rate over the steps after it, peak memory, and lcpatch's warnings."""
    from .api import patched

    if new_tokens < 2:
        raise LcpatchError(f"new_tokens {new_tokens}: give at least 2 (the rate is timed after the first decode step).")
    clock = Clock(ids.device)
    scope = contextlib.nullcontext() if recipe in (None, VANILLA) else patched(model, recipe)
    with scope, torch.no_grad(), PeakMemory(ids.device) as memory, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=1 + new_tokens,
            min_new_tokens=1 + new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
    step = getattr(getattr(out, CACHE_ARG), "decode_step", None)
    del out
    times = clock.times  # [first token (after prefill), after decode step 1, ...]
    rate = (len(times) - 2) / (times[-1] - times[1])
    row = {
        "prefill_s": times[0] - start,
        "first_step_s": times[1] - times[0],
        "decode_tokens_per_s": rate,
        "decode_tokens_per_s_all": rate * ids.shape[0],
        "peak_memory_mib": memory.peak_mib,
        "memory_kind": memory.kind,
        "notes": sorted({str(w.message) for w in caught if "lcpatch" in str(w.message)}),
    }
    if step is not None:
        row["cuda_graph"] = step.graph is not None
    return row


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def environment(device: torch.device, dtype: torch.dtype, described: str, weights: int) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import transformers

    from . import __version__

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "lcpatch": __version__,
        "dtype": str(dtype).removeprefix("torch."),
        "model": described,
        "weights_mib": weights / 2**20,
    }


def run(args: argparse.Namespace) -> dict:
    recipes = parse_recipes(args.recipes)
    lengths = parse_lengths(args.lengths)
    batches = parse_batches(args.batch)
    if args.new_tokens < 2:
        raise LcpatchError(f"--new-tokens {args.new_tokens}: give at least 2 (decode is timed after its first step).")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    model, described, weights = load_model(args.model, args.layers, device, dtype)
    result = {"schema": 1, "environment": environment(device, dtype, described, weights), "args": {}, "runs": []}
    result["args"] = {"recipes": recipes, "lengths": lengths, "batch": batches, "new_tokens": args.new_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (max(batches), max(lengths)), generator=generator)
    for recipe in recipes:
        for batch in batches:
            # Untimed: the first call of a recipe pays one-off costs (kernel compilation, allocator growth).
            measure(model, recipe, prompt[:batch, -min(lengths) :].to(device), 2)
            failed = None
            for length in lengths:
                cell = {"recipe": recipe, "batch": batch, "length": length}
                if failed:
                    cell["skipped"] = f"a shorter length failed: {failed}"
                else:
                    try:
                        cell |= measure(model, recipe, prompt[:batch, -length:].to(device), args.new_tokens)
                    except (torch.OutOfMemoryError, RuntimeError) as exc:
                        if not _is_out_of_memory(exc):
                            raise
                        failed = cell["error"] = "out of memory"
                    except LcpatchError as exc:  # e.g. a recipe's configured sequence limit
                        failed = cell["error"] = str(exc)
                result["runs"].append(cell)
                (args.out / RESULTS).write_text(json.dumps(result, indent=1))
                if not args.no_progress:
                    logger.info("%s", json.dumps(cell))
    report(result, args.out / RESULTS, markdown(result), plot)
    return result


def report(result: dict, results_file: Path, table: str, draw) -> None:
    """Next to the results JSON: the table (.md) and the figure (.png: `draw(result, plt)` returns it, titled
    here with the model, dtype, device and date); both printed."""
    markdown_file, figure = results_file.with_suffix(".md"), results_file.with_suffix(".png")
    markdown_file.write_text(table + "\n")
    env = result["environment"]
    plt = pyplot()
    if plt is not None:
        fig = draw(result, plt)
        fig.suptitle(f"{env['model']}, {env['dtype']}, {env['device']}, {env['date']}")
        fig.tight_layout()
        fig.savefig(figure, dpi=120)
        plt.close(fig)
    print(f"\n{env['model']}, {env['device']}:\n{table}\n")
    print(f"wrote {results_file}, {markdown_file} " + (f"and {figure}" if plt else f"({MISSING})"))


def _format(cell: dict) -> str:
    if "prefill_s" not in cell:
        return "OOM" if cell.get("error") == "out of memory" else ("skipped" if "skipped" in cell else "error")
    rate = cell["decode_tokens_per_s"]
    return f"{cell['prefill_s']:.3g} s / {rate:.3g} tok/s / {cell['peak_memory_mib']:.0f} MiB"


def markdown(result: dict) -> str:
    """One row per (recipe, batch), one column per length: prefill / decode per sequence / peak memory."""
    lengths = result["args"]["lengths"]
    lines = [
        "| recipe | batch | " + " | ".join(length_label(n) for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for recipe in result["args"]["recipes"]:
        for batch in result["args"]["batch"]:
            cells = {c["length"]: c for c in result["runs"] if c["recipe"] == recipe and c["batch"] == batch}
            row = " | ".join(_format(cells[n]) if n in cells else "" for n in lengths)
            lines.append(f"| {recipe} | {batch} | {row} |")
    return "\n".join(lines) + "\n\ncells: prefill time / decode tokens/s per sequence / peak memory over the weights"


def length_label(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot(result: dict, plt):
    """Prefill, decode and memory against prompt length: a line per recipe and batch."""
    panels = (("prefill_s", "prefill (s)"), ("decode_tokens_per_s", "decode (tokens/s per sequence)"))
    panels += (("peak_memory_mib", "peak memory over weights (MiB)"),)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for recipe in result["args"]["recipes"]:
            for batch in result["args"]["batch"]:
                points = [
                    (c["length"], c.get(key)) for c in result["runs"] if c["recipe"] == recipe and c["batch"] == batch
                ]
                points = [p for p in points if p[1] is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=f"{recipe}, batch {batch}")
        ax.set(xscale="log", xlabel="prompt length (tokens)", ylabel=label)
        ax.legend(fontsize=8)
    return fig


def run_cli(args: argparse.Namespace) -> int:
    return run_reporting_errors(run, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lcpatch bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))
