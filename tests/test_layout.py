"""The layout rules of the README's Architecture section, checked on the source tree."""

from __future__ import annotations

import ast
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


def test_cpu_methods_run_without_triton():
    # The README's main job installs ".[demo]", which has no triton (it is the kernels/flash extras'):
    # applying and running a method on the CPU must not import it.
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if not installed: importing it raises ImportError\n"
        "import torch, lcpatch\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=16, intermediate_size=32,\n"
        "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32))\n"
        "for method in ('lm-infinite', 'streaming-llm', 'infllm'):\n"
        "    lcpatch.apply(model, method)\n"
        "    model(torch.randint(0, 32, (1, 24)))\n"
        "    lcpatch.remove(model)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT / "tests")


# -- the import rules, read from the source (imports inside functions count too) ------------------------------
PACKAGE = ROOT / "lcpatch"
CORE = {"__init__", "api", "recipe", "runtime", "patching", "errors", "fields", "_compat", "serialization"}
TOOLS = ("lcpatch.bench", "lcpatch.demo", "lcpatch.cli", "lcpatch.eval")


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        parts = ("lcpatch", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts)
    else:
        parts = ("lcpatch", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports, wherever in the file the import stands."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _sources() -> dict[str, Path]:
    files = [p for p in PACKAGE.rglob("*.py") if "kernels" not in p.relative_to(PACKAGE).parts]
    files += list((ROOT / "kernels").glob("*.py"))
    return {_module_name(p): p for p in files}


def test_kernels_know_no_models():
    for path in (ROOT / "kernels").glob("*.py"):
        assert "lcpatch" not in path.read_text(), f"{path.name} names lcpatch: kernels import only torch and triton"
        outside = {m for m in _imports(path) if m.startswith("lcpatch") and not m.startswith("lcpatch.kernels")}
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_top_level_holds_the_face_and_the_core_only():
    assert {p.stem for p in PACKAGE.glob("*.py")} == CORE


def test_the_library_imports_no_tool():
    for name, path in _sources().items():
        if name.startswith(TOOLS):
            continue
        tools = {m for m in _imports(path) if m.startswith(TOOLS)}
        assert not tools, f"{name} (library) imports the tools {sorted(tools)}"


def test_attention_cache_models_and_kernels_import_one_way():
    layers = ("lcpatch.kernels", "lcpatch.models", "lcpatch.cache", "lcpatch.attention", "lcpatch.rope")
    graph: dict[str, set[str]] = {layer: set() for layer in layers}
    for name, path in _sources().items():
        here = ".".join(name.split(".")[:2])
        if here in graph:
            graph[here] |= {".".join(m.split(".")[:2]) for m in _imports(path)} & set(layers) - {here}

    def reaches(node: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in graph[node])

    circles = [layer for layer in layers if reaches(layer, layer, {layer})]
    assert not circles, f"these subpackages import each other in a circle: {circles} ({graph})"


def test_core_leaves_import_only_each_other():
    leaves = {"lcpatch.errors", "lcpatch.fields", "lcpatch.patching", "lcpatch._compat"}
    for name in leaves:
        imported = {m for m in _imports(_sources()[name]) if m.startswith("lcpatch")}
        outside = {m for m in imported if not any(m == leaf or m.startswith(leaf + ".") for leaf in leaves)}
        assert not outside, f"{name} imports {sorted(outside)}"
