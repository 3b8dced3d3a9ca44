"""`lcpatch bench attention`'s pieces that run without a GPU: FlexAttention's Λ block mask, built from block
bounds, against `create_block_mask` evaluating the same mask pair by pair."""

from __future__ import annotations

import pytest
import torch

from lcpatch.bench.attention import lambda_block_mask, lambda_mask_mod, lambda_pairs

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices")
FIELDS += ("full_q_num_blocks", "full_q_indices")  # what the backward reads


@pytest.mark.parametrize(
    "n,n_global,window",
    [(1024, 4, 256), (1000, 4, 300), (2048, 130, 256), (640, 4, 1024), (1900, 200, 77), (129, 4, 64), (512, 0, 128)],
)
def test_lambda_block_mask_is_create_block_mask(n: int, n_global: int, window: int):
    """Every block's kind (partial, full, none) and their order, padding included (n not a multiple of 128)."""

    mask_mod = lambda_mask_mod(n_global, window)
    expected = flex_attention.create_block_mask(mask_mod, None, None, n, n, device="cpu")
    built = lambda_block_mask(n, "cpu", n_global, window)
    for field in FIELDS:
        assert torch.equal(getattr(built, field), getattr(expected, field)), field
    assert built.seq_lengths == (n, n)


def test_lambda_pairs_counts_the_mask():
    n, n_global, window = 300, 4, 64
    i = torch.arange(n)
    mask = lambda_mask_mod(n_global, window)(None, None, i[:, None], i[None, :])
    assert lambda_pairs(n, n_global, window) == int(mask.sum())


def test_prefill_rows_are_the_median_of_rounds_taken_in_turn(monkeypatch):
    """Every method once per round, in turn; a row reports the median round; a row slower than a round's
    timing budget gets one round; a method that fails keeps its error and the others go on."""
    from lcpatch.bench import attention

    calls = []

    class FakeCase:
        def __init__(self, n):
            self.n = n

        def methods(self):
            return {"a": ("fa", 10), "b": ("fb", 20), "broken": ("fx", 30), "slow": ("fs", 40)}

        def time(self, fn, backward):
            if fn == "fx":
                raise RuntimeError("out of memory")
            calls.append((fn, backward))
            times = {"fa": [3.0, 1.0, 2.0], "fb": [5.0, 9.0, 7.0], "fs": [attention.PREFILL_REP_MS + 1.0]}
            return times[fn][sum(c == (fn, backward) for c in calls) - 1]

    monkeypatch.setattr(attention, "Prefill", FakeCase)
    monkeypatch.setattr(attention.torch.cuda, "empty_cache", lambda: None)
    rows = attention.run_prefill([64], backward_lengths=set())
    assert calls == [("fa", False), ("fb", False), ("fs", False)] + [("fa", False), ("fb", False)] * 2
    by_method = {row["method"]: row for row in rows}
    assert by_method["a"]["ms"] == 2.0 and by_method["a"]["round_ms"] == [3.0, 1.0, 2.0]
    assert by_method["b"]["ms"] == 7.0
    assert by_method["slow"]["round_ms"] == [attention.PREFILL_REP_MS + 1.0]
    assert "ms" not in by_method["broken"] and "out of memory" in by_method["broken"]["error"]
