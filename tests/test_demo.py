"""Perplexity by position and the demo, on a tiny random Llama (CPU, fp32, no downloads)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import lcpatch
from lcpatch.cli import main as cli_main
from lcpatch.demo import run as demo
from lcpatch.demo import smollm2
from lcpatch.eval.perplexity import bucket_perplexity, perplexity_by_position, perplexity_up_to, token_nll

from tiny_models import tiny_model

VOCAB = 97


def tiny_llama(seed: int = 0):
    return tiny_model(
        seed=seed, vocab_size=VOCAB, intermediate_size=128, max_position_embeddings=32, tie_word_embeddings=True
    )


def full_forward_nll(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (75,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("chunk", [1, 7, 32, 74, 75, 200])
def test_streaming_matches_one_forward_unpatched(ids, chunk):
    model = tiny_llama()
    reference = full_forward_nll(model, ids)
    nll = token_nll(model, ids, chunk=chunk, progress=False)
    assert nll.shape == (ids.numel() - 1,)
    assert (nll - reference).abs().max() <= 1e-4


def test_streaming_through_the_bounded_cache_matches_one_pass(ids):
    # n_global + window < 75 tokens: chunks must carry evicted-window state through the LambdaCache.
    model = tiny_llama()
    recipe = {"attention": {"method": "lm-infinite", "n_global": 4, "window": 16}}
    with lcpatch.patched(model, recipe):
        one_pass = token_nll(model, ids, chunk=ids.numel(), progress=False)
        streamed = token_nll(model, ids, chunk=10, progress=False)
    assert (streamed - one_pass).abs().max() <= 1e-4
    # Within the window the method is exact, so the first 16 predictions match the unpatched model.
    assert (one_pass[:15] - full_forward_nll(model, ids)[:15]).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["lm-infinite", "streaming-llm"])
def test_the_demo_chunk_scores_as_a_four_times_longer_one(ids, method):
    # The demo's forward passes of 1024 tokens (4096 before) at a tiny model's scale: same per-token losses.
    model = tiny_llama()
    with lcpatch.patched(model, {"attention": {"method": method, "n_global": 4, "window": 16}}):
        short, long = (token_nll(model, ids, chunk=chunk, progress=False) for chunk in (16, 64))
    assert (short - long).abs().max() <= 1e-4


def test_bucket_bookkeeping(ids):
    model = tiny_llama()
    nll = token_nll(model, ids, chunk=16, progress=False)
    result = perplexity_by_position(model, ids, bucket=16, chunk=16, progress=False)
    spans = [(b["start"], b["end"], b["tokens"]) for b in result["buckets"]]
    # Token 0 is never predicted: the first bucket scores one token fewer.
    assert spans == [(0, 16, 15), (16, 32, 16), (32, 48, 16), (48, 64, 16), (64, 75, 11)]
    for bucket in result["buckets"]:
        expected = nll[max(bucket["start"], 1) - 1 : bucket["end"] - 1].double().mean().item()
        assert bucket["nll"] == pytest.approx(expected, rel=1e-6)
        assert bucket["ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert result["overall"]["tokens"] == ids.numel() - 1 == sum(b["tokens"] for b in result["buckets"])
    assert result["overall"]["nll"] == pytest.approx(nll.double().mean().item(), rel=1e-6)
    json.dumps(result)  # plain numbers only, ready for the demo's JSON


def test_bucket_edge_cases():
    nll = torch.arange(1.0, 5.0)  # tokens 1..4 of a 5-token sequence
    assert [(b["start"], b["end"], b["tokens"]) for b in bucket_perplexity(nll, 1)["buckets"]] == [
        (1, 2, 1),
        (2, 3, 1),
        (3, 4, 1),
        (4, 5, 1),
    ]
    (only,) = bucket_perplexity(nll, 100)["buckets"]
    assert (only["start"], only["end"], only["tokens"], only["nll"]) == (0, 5, 4, 2.5)


def test_perplexity_up_to_weighs_the_leading_buckets_by_their_tokens():
    nll = torch.arange(1.0, 8.0)  # tokens 1..7 of an 8-token sequence; buckets [0, 3), [3, 6), [6, 8)
    result = bucket_perplexity(nll, 3)
    assert perplexity_up_to(result, 6) == pytest.approx(math.exp(nll[:5].double().mean().item()))
    assert perplexity_up_to(result, 7) == perplexity_up_to(result, 6)  # the last bucket ends at 8
    assert perplexity_up_to(result, 8) == pytest.approx(result["overall"]["ppl"])
    with pytest.raises(lcpatch.LcpatchError, match="no bucket ends at or before token 2; the first ends at 3"):
        perplexity_up_to(result, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"chunk": 0}, "chunk must be a positive integer; got 0"), ({"bucket": -2}, "bucket must be a positive integer")],
)
def test_perplexity_argument_errors(ids, kwargs, message):
    with pytest.raises(lcpatch.LcpatchError, match=message):
        perplexity_by_position(tiny_llama(), ids, progress=False, **kwargs)


def test_perplexity_needs_one_sequence():
    with pytest.raises(lcpatch.LcpatchError, match=r"got shape \(2, 5\)"):
        token_nll(tiny_llama(), torch.zeros(2, 5, dtype=torch.long), progress=False)
    with pytest.raises(lcpatch.LcpatchError, match="at least 2 token ids"):
        token_nll(tiny_llama(), [3], progress=False)


# -- the demo ------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character: enough to drive the demo without a real tokenizer."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False  # SmolLM2's GGUF was not trained with a BOS before plain text
        return {"input_ids": [ord(c) % VOCAB for c in text]}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the demo reaches the model load: argument errors must come first."""

    def refuse(**kwargs):
        raise AssertionError("the demo loaded the model before checking its arguments")

    monkeypatch.setattr(smollm2, "load_smollm2", refuse)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 3)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--text", "/no/such/book.txt"], "--text '/no/such/book.txt' is not a file"),
        (["--recipes", "vanilla,lm-infinty"], "unknown recipe 'lm-infinty'.*also accepts 'vanilla'"),
        (["--recipes", " , "], "--recipes is empty"),
        (["--recipes", "vanilla,vanilla"], "names a column twice"),
        (["--max-length", "0"], "--max-length must be an integer >= 2; got 0"),
        (["--bucket", "-1"], "--bucket must be a positive integer; got -1"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device"),
        (["--max-length", "1"], "--max-length must be an integer >= 2; got 1"),
        (["--out", "/no/such/folder/x.json"], r"the folder '/no/such/folder' does not exist; create it first"),
        (["--out", "."], r"--out '.*' is a folder; pass a file name, e\.g\. .*lcpatch-demo\.json"),
    ],
)
def test_demo_argument_errors(no_model, text_file, capsys, argv, message):
    argv = ["--text", str(text_file), *argv] if "--text" not in argv else argv
    assert cli_main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"has no text \(it is empty or only whitespace\)"),
        (b" \n\t\n", r"has no text"),
        (bytes(range(256)) * 4, r"is not a text file \(it holds NUL bytes"),
        ("café, naïve".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset 3\).*iconv -f latin1 -t utf-8"),
    ],
)
def test_demo_refuses_a_text_it_cannot_score_before_loading(no_model, tmp_path, capsys, content, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    assert cli_main(["demo", "--text", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and str(path) in err, err


def test_demo_reads_utf8_with_or_without_a_bom(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes("\ufeffCafé au lait".encode())
    assert demo.read_text(path, 16) == "Café au lait"


def test_demo_reads_line_ends_as_text_mode_does(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"Call me Ishmael.\r\nSome years ago\rnever mind\n")
    assert demo.read_text(path, 16) == path.read_text() == "Call me Ishmael.\nSome years ago\nnever mind\n"


def test_demo_unknown_flag_gets_the_demo_usage(no_model, capsys):
    with pytest.raises(SystemExit) as exit:
        cli_main(["demo", "--txt", "foo.txt"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert (
        err.startswith("usage: lcpatch demo ") and "lcpatch demo: error: unrecognized arguments: --txt foo.txt" in err
    )


def test_demo_bad_dtype_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_demo_without_text_says_how_to_get_one(no_model, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "_GUTENBERG", tmp_path / "nowhere")
    assert demo.main([]) == 2
    err = capsys.readouterr().err
    assert "no --text given" in err and "Project Gutenberg" in err


def test_text_shorter_than_max_length(text_file):
    with pytest.raises(
        lcpatch.LcpatchError, match=r"has only 192 tokens, fewer than --max-length 500; pass --max-length 192"
    ):
        demo.first_tokens(CharTokenizer(), text_file.read_text(), text_file, 500)
    with pytest.raises(lcpatch.LcpatchError, match=r"has only 1 token\(s\); perplexity needs at least 2"):
        demo.first_tokens(CharTokenizer(), "a", text_file, 500)


def test_demo_end_to_end_on_a_tiny_model(monkeypatch, text_file, tmp_path, capsys):
    # 150 tokens on a model "trained" at 32: lm-infinite (window 32) equals vanilla in the first bucket only.
    model = tiny_llama()
    monkeypatch.setattr(smollm2, "load_smollm2", lambda **kwargs: (model.to(kwargs["dtype"]), CharTokenizer()))
    out = tmp_path / "results.json"
    argv = ["--text", str(text_file), "--max-length", "150", "--bucket", "32", "--chunk", "40"]
    assert cli_main(["demo", *argv, "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| tokens | vanilla | lm-infinite |" in printed
    assert "| 0–32 |" in printed and "| 128–150 |" in printed
    assert re.search(r"\| wall time \| [\d.,]+ s \| [\d.,]+ s \|", printed)
    assert printed.rstrip().endswith(f"wrote {out}")
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and report["max_length"] == 150
    assert report["text"] == {"path": str(text_file), "tokens": 192, "tokens_used": 150}
    assert report["recipes"]["vanilla"] is None
    assert report["recipes"]["lm-infinite"]["attention"]["window"] == 32
    vanilla, lm_inf = report["results"]["vanilla"], report["results"]["lm-infinite"]
    assert [b["tokens"] for b in vanilla["buckets"]] == [31, 32, 32, 32, 22]
    assert vanilla["buckets"][0]["ppl"] == pytest.approx(lm_inf["buckets"][0]["ppl"], rel=1e-4)
    assert all(
        v["ppl"] != pytest.approx(m["ppl"], rel=1e-4)
        for v, m in zip(vanilla["buckets"][1:], lm_inf["buckets"][1:], strict=True)
    )
    assert lcpatch.describe(model).endswith("not patched by lcpatch.")  # the recipe was removed after measuring
