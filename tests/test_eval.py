"""`lcpatch eval`: each task end to end on a tiny random Llama, resume, scorers, argument errors."""

from __future__ import annotations

import argparse
import json
import random
import sys

import pytest

from lcpatch.cli import main
from lcpatch.cli.common import parse_lengths, parse_numbers
from lcpatch.errors import LcpatchError, RecipeError
from lcpatch.eval import run as eval_run
from lcpatch.eval.passkey import build_prompt, chat_wrap, score_passkey

from tiny_models import VOCAB

TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} w4{% endif %}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(600)))
    return root, tiny_model_dir, text


def _run(setup, out, task, *extra):
    _, model_dir, text = setup
    base = ["eval", "--model", str(model_dir), "--task", task, "--text", str(text), "--out", str(out)]
    return main([*base, "--device", "cpu", "--no-progress", "--recipes", "vanilla,lm-infinite", *extra])


def test_ppl_end_to_end(setup, tmp_path, capsys):
    assert _run(setup, tmp_path, "ppl", "--lengths", "256", "--bucket", "64", "--chunk", "100") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["schema"] == 1 and results["task"] == "ppl" and results["model"] == "tiny-llama"
    assert results["recipes"] == ["vanilla", "lm-infinite"]
    assert [r["recipe"] for r in results["records"]] == ["vanilla", "lm-infinite"]
    for record in results["records"]:
        assert record["length"] == 256 and record["depth"] is None
        assert [b["start"] for b in record["buckets"]] == [0, 64, 128, 192]
        assert record["overall"]["tokens"] == 255 and record["overall"]["ppl"] > 1
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    assert "| all |" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_retrieval_end_to_end_and_resume(setup, tmp_path, capsys, monkeypatch, task):
    extra = ("--lengths", "96,128", "--depths", "0,1", "--samples", "2")
    assert _run(setup, tmp_path, task, *extra) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == task and results["settings"]["depths"] == [0.0, 1.0]
    cells = {(r["recipe"], r["length"], r["depth"]) for r in results["records"]}
    assert cells == {(r, n, d) for r in ("vanilla", "lm-infinite") for n in (96, 128) for d in (0.0, 1.0)}
    for record in results["records"]:
        assert record["samples"] == 2 and len(record["answers"]) == 2 and 0 <= record["accuracy"] <= 1
        assert set(record["answers"][0]) == {"expected", "answer", "correct"}
    assert (tmp_path / f"{task}.png").stat().st_size > 1000
    assert "| 96 |" in capsys.readouterr().out

    calls = []
    real = eval_run.evaluate_cell
    monkeypatch.setattr(eval_run, "evaluate_cell", lambda *a, **k: calls.append(a[4:6]) or real(*a, **k))
    loads = []
    real_load = eval_run.load_model
    monkeypatch.setattr(eval_run, "load_model", lambda *a: loads.append(a) or real_load(*a))
    assert _run(setup, tmp_path, task, *extra) == 0
    assert calls == [] and loads == []  # all cells finished: nothing recomputed, no model loaded

    # Without matplotlib (an optional extra) the run still writes results and says why there is no figure.
    (tmp_path / f"{task}.png").unlink()
    capsys.readouterr()
    with monkeypatch.context() as without:
        without.setitem(sys.modules, "matplotlib", None)
        assert _run(setup, tmp_path, task, *extra) == 0
    assert "lcpatch[eval]" in capsys.readouterr().out and not (tmp_path / f"{task}.png").exists()

    # Drop one cell: only it is recomputed, and gives the same record (deterministic seeds).
    dropped = results["records"].pop(5)
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert _run(setup, tmp_path, task, *extra) == 0
    assert calls == [(dropped["length"], dropped["depth"])]
    again = json.loads((tmp_path / "results.json").read_text())["records"][-1]
    assert again["answers"] == dropped["answers"] and len(loads) == 1


def test_chat_template_wraps_prompt(tokenizer):
    plain = build_prompt(tokenizer, [5, 6, 7], 40, 0.5, "w9 w9", "w10", "w11", random.Random(0))
    tokenizer.chat_template = TEMPLATE
    before, after = chat_wrap(tokenizer)
    assert before == [1] and after == [2, 4]
    wrapped = build_prompt(tokenizer, [5, 6, 7], 40, 0.5, "w9 w9", "w10", "w11", random.Random(0))
    assert len(plain) == len(wrapped) == 40
    assert wrapped[0] == 1 and wrapped[-3:] == [2, 4, 11] and plain[-2:] == [10, 11]


def test_prompt_length_and_depth(tokenizer):
    haystack = list(range(20, 30))
    for depth in (0.0, 0.5, 1.0):
        ids = build_prompt(tokenizer, haystack, 60, depth, "w9 w9", "w10", "w11", random.Random(1))
        assert len(ids) == 60
        at = next(i for i in range(len(ids) - 1) if ids[i : i + 2] == [9, 9])
        body = [i for i, t in enumerate(ids) if 20 <= t < 30]
        if depth == 0.0:
            assert at < body[0]
        if depth == 1.0:
            assert at > body[-1]
    with pytest.raises(LcpatchError, match="at least"):
        build_prompt(tokenizer, haystack, 5, 0.5, "w9 w9", "w10", "w11", random.Random(1))


def test_scorers():
    assert score_passkey(" 12345. Remember", "12345")
    assert score_passkey("is 12345", "12345")
    assert not score_passkey(" 123456", "12345")
    assert not score_passkey(" 54321 12345", "12345")
    assert not score_passkey("no number", "12345")
    assert eval_run.score_needle(" Harbor. It is", "harbor")
    assert eval_run.score_needle("  harbor", "harbor")
    assert not eval_run.score_needle(" the harbor", "harbor")
    assert not eval_run.score_needle(" harbors", "harbor")
    assert not eval_run.score_needle("", "harbor")


def test_parse_lengths_and_depths():
    assert parse_lengths("1k, 2k,512,1.5k,1m") == [1024, 2048, 512, 1536, 1024**2]
    for bad in ("", "1x", "0", "-1k", "1.3", "1k,1024"):
        with pytest.raises(LcpatchError, match="--lengths"):
            parse_lengths(bad)
    assert parse_numbers("--g-weights", "8,1,1.5") == (8.0, 1.0, 1.5)
    for bad in ("", "8,,1", "8,x"):
        with pytest.raises(LcpatchError, match=f"--g-weights: {bad!r} is not a comma-separated list of numbers"):
            parse_numbers("--g-weights", bad)
    assert eval_run.parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("1.5", "x", "0,0"):
        with pytest.raises(LcpatchError, match="--depths"):
            eval_run.parse_depths(bad)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"--task": "qa"}, LcpatchError, "--task 'qa' is not a task"),
        ({"--lengths": "1q"}, LcpatchError, "--lengths"),
        ({"--depths": "2"}, LcpatchError, "--depths"),
        ({"--text": "missing.txt"}, LcpatchError, "is not a file"),
        ({"--recipes": "vanilla,no-such-recipe"}, RecipeError, "--recipes"),
        ({"--model": "no/such/folder"}, LcpatchError, "neither a local model folder"),
        ({"--samples": "0"}, LcpatchError, "--samples must be a positive"),
        ({"--dtype": "int3"}, LcpatchError, "--dtype"),
    ],
)
def test_bad_arguments_fail_before_loading(setup, tmp_path, monkeypatch, capsys, change, error, message):
    monkeypatch.setattr(eval_run, "load_model", lambda *a: pytest.fail("model loaded"))
    _, model_dir, text = setup
    options = {"--model": str(model_dir), "--task": "passkey", "--text": str(text), "--out": str(tmp_path / "o")}
    options |= {"--device": "cpu", **change}
    argv = [part for pair in options.items() for part in pair]
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    with pytest.raises(error, match=message):
        eval_run.run(parser.parse_args(argv))
    assert main(["eval", *argv]) == 2
    assert message.split()[0] in capsys.readouterr().err


def test_resume_refuses_other_settings(setup, tmp_path):
    assert _run(setup, tmp_path, "ppl", "--lengths", "128", "--bucket", "64") == 0
    with pytest.raises(LcpatchError, match="holds a different run"):
        parser = argparse.ArgumentParser()
        eval_run.add_arguments(parser)
        _, model_dir, text = setup
        argv = ["--model", str(model_dir), "--task", "ppl", "--text", str(text), "--out", str(tmp_path)]
        eval_run.run(parser.parse_args([*argv, "--lengths", "128", "--bucket", "32", "--device", "cpu"]))


def test_text_from_a_datasets_name(setup, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    _, model_dir, text = setup
    words = text.read_text().split()
    rows = datasets.Dataset.from_dict({"body": [" ".join(words[:300]), " ".join(words[300:])]})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append((a, k)) or rows)
    argv = ["eval", "--model", str(model_dir), "--task", "ppl", "--text", "someone/books", "--text-field", "body"]
    argv += ["--out", str(tmp_path), "--device", "cpu", "--no-progress", "--recipes", "vanilla", "--lengths", "128"]
    assert main(argv) == 0
    assert asked == [(("someone/books", None), {"split": "train"})]
    assert json.loads((tmp_path / "results.json").read_text())["records"][0]["overall"]["tokens"] == 127


def test_text_path_typo_never_reaches_the_hub(setup, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a missing file went to the Hub"))
    assert _run(setup, tmp_path, "ppl", "--lengths", "64") == 0  # the fixture's text loads
    for typo in ("book.txt", "./book", "~/books/*.txt"):
        _, model_dir, _ = setup
        argv = ["eval", "--model", str(model_dir), "--task", "ppl", "--text", typo, "--out", str(tmp_path / "x")]
        assert main([*argv, "--device", "cpu", "--no-progress", "--lengths", "64"]) == 2
        assert "is not a file, folder or glob match" in capsys.readouterr().err
