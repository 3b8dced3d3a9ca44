"""The rest of the ecosystem around a patched model: save/load, pipelines, streamers, device_map,
torch.compile, PEFT in either order, gradient checkpointing, long streams, failed applies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TextStreamer, pipeline

import lcpatch
from lcpatch._compat import CACHE_ARG

from naive_lambda import naive_logits
from tiny_models import random_ids, tiny_model

RECIPE = {"attention": {"method": "lm-infinite", "n_global": 4, "window": 16}}


@torch.no_grad()
def test_save_pretrained_saves_weights_and_recipe_and_reloads(tmp_path):
    model = tiny_model()
    ids = random_ids(60)
    plain = model(ids).logits
    lcpatch.apply(model, RECIPE)
    patched = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "lcpatch_recipe.yaml").is_file()
    assert "lcpatch" not in (tmp_path / "config.json").read_text()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, plain)
    assert torch.equal(lcpatch.from_pretrained(tmp_path).eval()(ids).logits, patched)
    assert torch.equal(lcpatch.apply(reloaded, tmp_path)(ids).logits, patched)


def test_saved_folder_loads_without_lcpatch(tmp_path):
    model = lcpatch.apply(tiny_model(), RECIPE)
    model.save_pretrained(tmp_path)
    code = (
        "import sys; sys.modules['lcpatch'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ""})


def test_from_pretrained_without_recipe_says_how(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(lcpatch.RecipeError, match="lcpatch_recipe.yaml"):
        lcpatch.from_pretrained(tmp_path)


def test_pipeline_and_text_streamer(capsys, tokenizer):
    model = lcpatch.apply(tiny_model(), RECIPE)
    prompt = " ".join(f"w{int(t)}" for t in random_ids(40)[0])
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith(prompt) and len(out[0]["generated_text"]) > len(prompt)
    inputs = tokenizer(prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out.strip().startswith("w")


@torch.no_grad()
def test_device_map_auto_model(tmp_path):
    pytest.importorskip("accelerate")
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    ids = random_ids(60)
    expected = naive_logits(model, ids, 4, 16, 16)
    lcpatch.apply(model, RECIPE)
    assert (model(ids).logits - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_torch_compile_traces_the_patched_model():
    model = lcpatch.apply(tiny_model(), RECIPE)
    ids = random_ids(40)
    expected = model(ids).logits
    compiled = torch.compile(model, backend="eager")  # dynamo tracing of hooks + attention; no codegen
    assert (compiled(ids).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("order", ["patch-then-peft", "peft-then-patch"])
def test_peft_in_either_order(order):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    ids = random_ids(60)
    expected = naive_logits(model, ids, 4, 16, 16)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    if order == "patch-then-peft":
        wrapped = peft.get_peft_model(lcpatch.apply(model, RECIPE), config)
    else:
        wrapped = lcpatch.apply(peft.get_peft_model(model, config), RECIPE)
    with torch.no_grad():
        assert (wrapped(input_ids=ids).logits - expected).abs().max() <= 1e-4
    lcpatch.remove(wrapped)
    assert model.config._attn_implementation != "lcpatch"


def test_gradient_checkpointing_training_step():
    model = tiny_model().train()
    model.gradient_checkpointing_enable()
    lcpatch.apply(model, RECIPE)
    ids = random_ids(48)
    reference = tiny_model().train()
    lcpatch.apply(reference, RECIPE)
    loss = model(ids, labels=ids).loss
    loss.backward()
    ref_loss = reference(ids, labels=ids, use_cache=False).loss
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)


@torch.no_grad()
def test_long_stream_keeps_memory_bounded():
    """20k tokens streamed chunk by chunk, then decoding: the cache never grows past its bound."""
    model = lcpatch.apply(tiny_model(), RECIPE)
    cache = lcpatch.make_cache(model)
    sizes = []
    for start in range(0, 20_000, 500):
        model(random_ids(500, seed=start), past_key_values=cache)
        sizes.append(max(cache.stored_lengths()))
    # Continuing from a cache, generate takes the new tokens with a mask over the whole stream.
    mask = torch.ones(1, 20_001, dtype=torch.long)
    out = model.generate(random_ids(1), attention_mask=mask, past_key_values=cache, max_new_tokens=50, do_sample=False)
    assert out.shape[1] == 51 and max(sizes) == 4 + 16 and cache.get_seq_length() == 20_050
    keys = cache.layers[0].keys
    assert keys.shape[-2] == 16 and keys.untyped_storage().nbytes() <= keys.numel() * keys.element_size() * 2


@torch.no_grad()
@pytest.mark.parametrize("name", sorted({"past_key_values", CACHE_ARG}))
def test_a_cache_passed_under_either_name_is_used(name):
    """transformers 5.24 renamed `past_key_values` to `cache`: a cache given under the name the installed version
    uses, or under the old one that it still accepts, is the one forward, the decoder and generate fill."""
    model = lcpatch.apply(tiny_model(), RECIPE)
    ids = random_ids(40)
    whole = model(ids).logits
    cache = lcpatch.make_cache(model)
    model(ids[:, :30], **{name: cache})
    rest = model(ids[:, 30:], attention_mask=torch.ones_like(ids), **{name: cache}).logits
    assert cache.get_seq_length() == 40 and torch.allclose(rest, whole[:, 30:], atol=1e-5)
    cache = lcpatch.make_cache(model)
    model.get_decoder()(input_ids=ids, **{name: cache})
    assert cache.get_seq_length() == 40
    cache = lcpatch.make_cache(model)
    model.generate(ids, max_new_tokens=3, do_sample=False, **{name: cache})
    assert cache.get_seq_length() == 42
    if name != CACHE_ARG:
        with pytest.raises(lcpatch.CacheError, match="passed twice"):
            model.generate(ids, max_new_tokens=1, **{name: cache, CACHE_ARG: cache})


def test_failed_apply_leaves_the_model_unchanged(monkeypatch):
    import lcpatch.api

    model = tiny_model()
    before = dict(model.__dict__)
    attn = model.config._attn_implementation
    monkeypatch.setattr(lcpatch.api, "install_save_pretrained", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        lcpatch.apply(model, RECIPE)
    assert model.config._attn_implementation == attn
    assert model.__dict__.keys() == before.keys()
    decoder = model.get_decoder()
    assert not decoder._forward_pre_hooks and not decoder.rotary_emb._forward_hooks
    monkeypatch.undo()
    lcpatch.apply(model, RECIPE)
