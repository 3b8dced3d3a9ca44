"""The `lcpatch` command itself: --version, every command's --help without torch, usage lines, what the help
says (flags, defaults, recipes, benchmarks), and unknown flags answered with the command's own usage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import lcpatch
from lcpatch.bench.shapes import PRESETS
from lcpatch.cli import COMMANDS, main
from lcpatch.cli.bench import BENCHMARKS
from lcpatch.cli.data import DATA_BUILDERS
from lcpatch.cli.train import FIELDS, MEANINGS

ROOT = Path(__file__).resolve().parents[1]

# Runs argv (a list literal) through main in a fresh interpreter and prints what was imported.
PROBE = """
import sys
from lcpatch.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("LOADED", "torch" in sys.modules, "transformers" in sys.modules)
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


SUBCOMMANDS = [f"bench {name}" for name in BENCHMARKS] + [f"data {name}" for name in DATA_BUILDERS]


@pytest.mark.parametrize("command", [None, *COMMANDS, *SUBCOMMANDS])
def test_help_imports_no_torch_and_names_lcpatch_in_its_usage(command):
    words = command.split() if command else []
    found = _python("-c", PROBE.format(argv=[*words, "--help"]))
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith(f"usage: {' '.join(['lcpatch', *words])} "), found.stdout[:200]
    assert found.stdout.rstrip().endswith("LOADED False False"), "--help imported torch or transformers"


@pytest.mark.parametrize(
    ("module", "usage"),
    [
        ("lcpatch.cli.train", "lcpatch train"),
        ("lcpatch.demo.run", "lcpatch demo"),
        ("lcpatch.bench.attention", "lcpatch bench attention"),
        ("lcpatch.bench.decode", "lcpatch bench decode"),
    ],
)
def test_modules_run_with_python_m_say_lcpatch_in_their_usage(module, usage):
    found = _python("-m", module, "--help")
    assert found.returncode == 0 and found.stdout.startswith(f"usage: {usage} "), found.stdout[:200] + found.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert (
        capsys.readouterr().out.strip() == f"lcpatch {lcpatch.__version__}" == f"lcpatch {metadata.version('lcpatch')}"
    )


def test_importing_lcpatch_loads_torch_only_when_a_public_name_is_used():
    probe = "import sys, lcpatch; a = 'torch' in sys.modules; lcpatch.apply; print(a, 'torch' in sys.modules)"
    found = _python("-c", probe)
    assert found.stdout.split() == ["False", "True"], found.stderr


def test_every_public_name_resolves_and_is_listed():
    assert set(lcpatch.__all__) <= set(dir(lcpatch))
    for name in lcpatch.__all__:
        assert getattr(lcpatch, name) is not None
    from lcpatch import LcpatchError, apply  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute 'aply'"):
        lcpatch.aply  # noqa: B018


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_train_help_explains_every_flag_with_its_default_and_names_the_training_recipes(capsys):
    text = " ".join(_help(capsys, "train").split())
    options = text.split(" options: ", 1)[1]
    training_recipes = [name for name in lcpatch.builtin_recipes() if lcpatch.load_recipe(name).training]
    assert training_recipes and f"Built-in training recipes: {', '.join(training_recipes)}" in text
    assert set(MEANINGS) == set(FIELDS)  # a new training field needs its meaning here
    starts = [options.index(f"--{name.replace('_', '-')} VALUE") for name in FIELDS] + [len(options)]
    for name, start, end in zip(FIELDS, starts, starts[1:], strict=False):
        described = options[start:end]
        assert MEANINGS[name].split()[0] in described and "default" in described, described
    # The values of the recipes: longpo sets max_steps 200, the others 1000; only e2llm has g_max.
    assert "optimizer steps (default: e2llm 1000; logo 1000; longpo 200)" in text
    assert "(e2llm only; default 20)" in text


def test_bench_help_names_its_benchmarks_and_the_default(capsys):
    text = _help(capsys, "bench")
    assert tuple(BENCHMARKS) == ("cost", "attention", "decode")
    assert re.search(r"^  cost \(default\): Cost against context length", text, re.M)
    assert re.search(r"^  attention: ", text, re.M) and re.search(r"^  decode: ", text, re.M)


def test_bench_cost_help_names_the_presets(capsys):
    text = _help(capsys, "bench", "cost")
    assert f"(cost does not depend on the weights): {', '.join(PRESETS)}." in text
    assert f"a preset: {', '.join(PRESETS)}" in " ".join(text.split())


def test_unknown_train_recipe_is_one_line_and_a_failure(capsys):
    assert main(["train", "nonexistent-recipe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe 'nonexistent-recipe'") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("argv", "usage", "unknown"),
    [
        (["demo", "--txt", "foo.txt"], "lcpatch demo", "--txt foo.txt"),
        (["train", "e2llm", "--max-stpes", "3"], "lcpatch train", "--max-stpes"),
        (["bench", "--nope", "--model", "m", "--out", "d"], "lcpatch bench cost", "--nope"),
        (["bench", "decode", "--nope", "--out", "d"], "lcpatch bench decode", "--nope"),
        (["data", "logo", "--nope", "--model", "m", "--data", "d", "--out", "o"], "lcpatch data logo", "--nope"),
    ],
)
def test_an_unknown_flag_gets_the_command_usage(capsys, argv, usage, unknown):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.startswith(f"usage: {usage} ") and f"{usage}: error: unrecognized arguments: {unknown}" in err, err
