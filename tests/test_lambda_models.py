"""LM-Infinite / StreamingLLM end to end on tiny models of every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import lcpatch
from lcpatch._compat import CACHE_ARG

from naive_lambda import naive_logits
from tiny_models import FAMILIES, CollectStreamer, random_ids, tiny_model

ALL = sorted(FAMILIES)


def lm_infinite(n_global=4, window=16, max_distance="auto", **generation):
    recipe = {
        "attention": {"method": "lm-infinite", "n_global": n_global, "window": window, "max_distance": max_distance}
    }
    if generation:
        recipe["generation"] = generation
    return recipe


def streaming(n_global=4, window=16):
    return {"attention": {"method": "streaming-llm", "n_global": n_global, "window": window}}


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("method", ["lm-infinite", "streaming-llm"])
@torch.no_grad()
def test_within_window_equals_unpatched(family, method):
    model = tiny_model(family)
    ids = random_ids(40, batch=2)
    expected = model(ids).logits
    with lcpatch.patched(model, {"attention": {"method": method, "n_global": 4, "window": 64}}):
        got = model(ids).logits
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize(
    "recipe, naive_args",
    [
        (lm_infinite(4, 16), (4, 16, 16)),
        (lm_infinite(3, 16, 24), (3, 16, 24)),
        (streaming(4, 16), (4, 16, None)),
    ],
    ids=["lm-infinite", "lm-infinite-cap24", "streaming-llm"],
)
@torch.no_grad()
def test_beyond_window_equals_naive_reference(family, recipe, naive_args):
    model = tiny_model(family)
    ids = random_ids(80, batch=2)
    expected = naive_logits(model, ids, *naive_args)
    with lcpatch.patched(model, recipe):
        got = model(ids, use_cache=False).logits
        cached = model(ids).logits  # through the bounded cache, one forward
    assert (got - expected).abs().max() <= 1e-4
    assert (cached - expected).abs().max() <= 1e-4


class RecordCacheSize(StoppingCriteria):
    def __init__(self, cache):
        self.cache, self.sizes = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        self.sizes.append(max(self.cache.stored_lengths()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.no_grad()
def test_phi3_generate_keeps_the_prefilled_cache_past_its_original_length():
    # Phi-3's generate() throws a cache away once the sequence passes original_max_position_embeddings while the
    # cache holds no more than that: the chunked prefill must leave it more, or the whole prompt is run again
    # (before transformers 5.20: only its last chunk, on an empty cache).
    model = tiny_model("phi3", original_max_position_embeddings=64)
    lcpatch.apply(model, lm_infinite(4, 16, prefill_chunk=16))
    cache = lcpatch.make_cache(model)
    out = model.generate(
        random_ids(72),
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        return_dict_in_generate=True,
        **{CACHE_ARG: cache},
    )
    assert getattr(out, CACHE_ARG) is cache
    assert cache.get_seq_length() == 72 + 3 - 1


@pytest.mark.parametrize("family", ALL)
@torch.no_grad()
def test_generate_equals_stepwise_recompute(family):
    model = tiny_model(family)
    prompt = random_ids(12)
    new_tokens = 200
    lcpatch.apply(model, lm_infinite(4, 16, prefill_chunk=5))
    cache = lcpatch.make_cache(model)
    recorder = RecordCacheSize(cache)
    out = model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        past_key_values=cache,
        stopping_criteria=StoppingCriteriaList([recorder]),
    )
    lcpatch.remove(model)

    sequence = prompt
    for _ in range(new_tokens):
        logits = naive_logits(model, sequence, 4, 16, 16)[:, -1:]
        logits[..., model.generation_config.eos_token_id] = float("-inf")  # as min_new_tokens does
        sequence = torch.cat((sequence, logits.argmax(-1)), dim=1)
    assert torch.equal(out, sequence)
    assert len(recorder.sizes) == new_tokens
    assert max(recorder.sizes) <= 4 + 16
    assert cache.get_seq_length() == 12 + new_tokens - 1


@pytest.mark.parametrize("family", ALL)
@torch.no_grad()
def test_ragged_batch_equals_one_by_one(family):
    model = tiny_model(family)
    prompts = [random_ids(n, seed=n)[0] for n in (9, 23, 30)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    with lcpatch.patched(model, lm_infinite(4, 16, prefill_chunk=8)):
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=30, min_new_tokens=30, do_sample=False)
            assert torch.equal(batched[row, width:], alone[0, len(p) :]), f"row {row} differs"


def test_patched_context_undoes_after_exception():
    model = tiny_model()
    ids = random_ids(30)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with lcpatch.patched(model, lm_infinite(2, 8)):
            assert "lcpatch" in repr(model)
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert "not patched" in lcpatch.describe(model)


@torch.no_grad()
def test_long_stream_keeps_cache_bounded_and_returns_cache():
    model = tiny_model()
    lcpatch.apply(model, "lm-infinite")
    out = model.generate(random_ids(300), max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, lcpatch.LambdaCache)
    window = model.config.max_position_embeddings  # auto = pretraining length
    assert max(cache.stored_lengths()) <= 10 + window
    assert cache.get_seq_length() == 304


@torch.no_grad()
def test_generate_features_sampling_streamer_stopping():
    model = tiny_model()
    lcpatch.apply(model, lm_infinite(4, 16))
    prompt = random_ids(40)
    torch.manual_seed(1)
    a = model.generate(prompt, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=25)
    torch.manual_seed(1)
    b = model.generate(prompt, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=25)
    assert torch.equal(a, b)
    streamer = CollectStreamer()
    out = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, streamer=streamer)
    assert streamer.tokens[-1] == "end" and len(streamer.tokens) == 12  # prompt, 10 tokens, end
    stop_id = int(out[0, 45])
    stopped = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=stop_id)
    assert stopped.shape[1] <= 46 and int(stopped[0, -1]) == stop_id


@torch.no_grad()
def test_chunked_prefill_never_runs_more_than_a_chunk():
    model = tiny_model()
    lengths = []
    model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    lcpatch.apply(model, lm_infinite(4, 16, prefill_chunk=16))
    chunked = model.generate(random_ids(100), max_new_tokens=5, do_sample=False)
    assert max(lengths) == 16 and sum(lengths[:7]) == 100
    lcpatch.remove(model)
    lcpatch.apply(model, lm_infinite(4, 16, prefill_chunk=4096))
    whole = model.generate(random_ids(100), max_new_tokens=5, do_sample=False)
    assert torch.equal(chunked, whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs_and_stays_close(dtype):
    model = tiny_model(dtype=dtype)
    ids = random_ids(60)
    expected = naive_logits(tiny_model(), ids, 4, 16, 16)
    with lcpatch.patched(model, lm_infinite(4, 16)):
        got = model(ids).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() < 0.1 * expected.abs().max()


@torch.no_grad()
def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = tiny_model()
    ids = random_ids(60)
    expected = naive_logits(model, ids, 4, 16, 16)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lcpatch.apply(wrapped, lm_infinite(4, 16))
    assert (wrapped(input_ids=ids).logits - expected).abs().max() <= 1e-4
    out = wrapped.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 65
    lcpatch.remove(wrapped)


@torch.no_grad()
def test_two_models_carry_different_recipes():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    ids = random_ids(60)
    lcpatch.apply(a, lm_infinite(4, 16))
    lcpatch.apply(b, streaming(4, 16))
    assert (a(ids).logits - naive_logits(tiny_model(), ids, 4, 16, 16)).abs().max() <= 1e-4
    assert (b(ids).logits - naive_logits(tiny_model(), ids, 4, 16, None)).abs().max() <= 1e-4


def test_training_backward_through_reference():
    model = tiny_model().train()
    lcpatch.apply(model, lm_infinite(4, 16))
    ids = random_ids(48)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
