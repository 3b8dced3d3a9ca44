"""InfLLM on the fast decode path (generation.decode graph / static): fixed-shape steps equal the eager walk.

On a CPU the step runs without capture (`static`): the cache, buffers and forward that a CUDA graph
records. `pytest -m gpu tests/test_infllm_fast_decode.py` checks the capture on a CUDA machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lcpatch
from lcpatch import BlockMemoryCache
from lcpatch._compat import CACHE_ARG

from tiny_models import random_ids, tiny_model

# Blocks of 4 tokens leave a 16-token window: 30 new tokens form ~7 blocks during decoding.
CFG = dict(
    n_init=4, n_local=16, block_size=4, topk=2, repr_topk=2, exc_block_size=8, chunk_size=16, max_cached_blocks=3
)
NEW = 30


def recipe(decode, compile="auto", **overrides):
    return {
        "attention": {"method": "infllm", **{**CFG, **overrides}},
        "generation": {"decode": decode, "compile": compile},
    }


def generate(model, decode, ids, new_tokens=NEW, compile="auto", **kwargs):
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with lcpatch.patched(model, recipe(decode, compile, **kwargs.pop("attention", {}))):
        return model.generate(ids, return_dict_in_generate=True, output_logits=True, **options, **kwargs)


def assert_same_run(fast, eager):
    assert fast.past_key_values.decode_step is not None and eager.past_key_values.decode_step is None
    assert torch.equal(fast.sequences, eager.sequences)
    for a, b in zip(fast.logits, eager.logits, strict=True):
        assert (a - b).abs().max() <= 1e-4
    assert fast.past_key_values.memory_blocks() == eager.past_key_values.memory_blocks()
    assert fast.past_key_values.get_seq_length() == eager.past_key_values.get_seq_length()


def left_padded(lengths):
    prompts = [random_ids(n, seed=n)[0] for n in lengths]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, ids.shape[1] - len(prompt) :], mask[row, ids.shape[1] - len(prompt) :] = prompt, 1
    return prompts, ids, mask


@pytest.mark.parametrize("length", [1, 3, 17, 40])
@torch.no_grad()
def test_static_steps_equal_the_eager_walk(length):
    # From a prompt shorter than the init tokens (1, 3) to one with blocks formed before decoding (40).
    model = tiny_model()
    ids = random_ids(length, seed=length)
    fast, eager = generate(model, "static", ids), generate(model, "eager", ids)
    assert isinstance(fast.past_key_values, BlockMemoryCache)
    assert fast.past_key_values.memory_blocks()[0][0] >= (length + NEW - 16 - 4) // 4 - 1  # formed while decoding
    assert_same_run(fast, eager)


@torch.no_grad()
def test_compiled_static_steps_equal_the_eager_walk():
    """generation.compile: true over InfLLM's prefill chunks and step (blocks formed between steps, a left-padded batch)."""
    model = tiny_model()
    _, ids, mask = left_padded([2, 19, 33])
    fast = generate(model, "static", ids, compile=True, attention_mask=mask)
    assert type(fast.past_key_values.decode_step.forward).__name__ == "CompiledForward"
    assert type(fast.past_key_values.prefill_forward).__name__ == "CompiledForward"  # the 33-token prompt's first chunk
    assert_same_run(fast, generate(model, "eager", ids, attention_mask=mask))


@torch.no_grad()
def test_left_padded_batch_equals_eager_and_each_prompt_alone():
    model = tiny_model("qwen2")
    prompts, ids, mask = left_padded([2, 19, 33])
    fast = generate(model, "static", ids, attention_mask=mask)
    assert_same_run(fast, generate(model, "eager", ids, attention_mask=mask))
    for row, prompt in enumerate(prompts):
        alone = generate(model, "static", prompt[None]).sequences
        assert torch.equal(fast.sequences[row, ids.shape[1] :], alone[0, len(prompt) :]), row


@torch.no_grad()
def test_offloaded_blocks_on_the_static_path():
    model = tiny_model()
    ids = random_ids(40)
    offloaded = generate(model, "static", ids, attention={"offload": "cpu"})
    assert offloaded.past_key_values.offloaded_layers() == [0, 1]
    assert_same_run(offloaded, generate(model, "eager", ids))


@torch.no_grad()
def test_padding_inside_decode_steps_is_counted_exactly():
    """Steps whose token is padding for one row (generate never sends one; a hand-written loop may):
    that row's blocks form when its real tokens say so, as on the eager path."""
    model = tiny_model()
    batch = random_ids(21, seed=3).repeat(2, 1)
    tokens = random_ids(24, seed=4)[0]
    padding_steps = {2, 5, 6, 11}  # steps at which row 0's token is padding
    logits, blocks = {}, {}
    for decode in ("static", "eager"):
        with lcpatch.patched(model, recipe(decode)):
            out = model.generate(batch, max_new_tokens=1, return_dict_in_generate=True)
            cache, mask = out.past_key_values, torch.ones_like(batch)  # the generated token is never fed
            assert (cache.decode_step is not None) == (decode == "static")
            steps = []
            for step, token in enumerate(tokens):
                valid = torch.tensor([[int(step not in padding_steps)], [1]])
                mask = torch.cat((mask, valid), dim=1)
                positions = (mask.sum(dim=1, keepdim=True) - 1) * valid
                step_out = model(
                    input_ids=token.repeat(2, 1), attention_mask=mask, position_ids=positions, **{CACHE_ARG: cache}
                )
                steps.append(step_out.logits[:, -1] * valid)  # a padding step's logits are any
            logits[decode], blocks[decode] = torch.stack(steps, dim=1), cache.memory_blocks()
    assert blocks["static"] == blocks["eager"] and blocks["static"][0][0] < blocks["static"][0][1]
    assert (logits["static"] - logits["eager"]).abs().max() <= 1e-4


@torch.no_grad()
def test_sliding_window_layers_decode_eagerly_and_say_why():
    model = tiny_model("gemma3")
    ids = random_ids(20)
    with pytest.warns(RuntimeWarning, match="sliding-window layers keep a cache that grows"):
        fast = generate(model, "static", ids)
    assert torch.equal(fast.sequences, generate(model, "eager", ids).sequences)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@torch.no_grad()
def test_graph_is_captured_and_replays_the_static_step():
    model = tiny_model(hidden_size=256, head_dim=64).cuda()
    _, ids, mask = left_padded([3, 17, 40])
    ids, mask = ids.cuda(), mask.cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = generate(model, "graph", ids, compile=False, attention_mask=mask, new_tokens=60)
        compiled = generate(model, "graph", ids, attention_mask=mask, new_tokens=60)  # compile: auto
    assert not [w for w in caught if "lcpatch" in str(w.message)]
    assert graph.past_key_values.decode_step.graph is not None
    static = generate(model, "static", ids, attention_mask=mask, new_tokens=60)
    assert torch.equal(graph.sequences, static.sequences)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(graph.logits, static.logits, strict=True))
    eager = generate(model, "eager", ids, attention_mask=mask, new_tokens=60)
    assert_same_run(graph, eager)
    assert type(compiled.past_key_values.decode_step.forward).__name__ == "CompiledForward"
    assert_same_run(compiled, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@torch.no_grad()
def test_graph_with_offloaded_blocks_says_why_and_stays_exact():
    model = tiny_model(hidden_size=256, head_dim=64).cuda()
    ids = random_ids(40).cuda()
    with pytest.warns(RuntimeWarning, match="memory blocks are in host memory"):
        offloaded = generate(model, "graph", ids, attention={"offload": "cpu"})
    assert offloaded.past_key_values.decode_step.graph is None
    assert_same_run(offloaded, generate(model, "eager", ids))
