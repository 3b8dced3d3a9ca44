"""The fast decode path (generation.decode): static-shape ring cache, its decode step, fall-backs, chunked prefill.

On a CPU the step runs without CUDA graph capture (`decode: static`): the same cache, buffers and
forward that a graph records, so these tests check what a graph replays. Tests marked `gpu` check
the capture itself:  pytest -m gpu tests/test_fast_decode.py  (on a CUDA machine).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import lcpatch
from lcpatch.attention.backends import TORCH
from lcpatch.bench.presets import load_model
from lcpatch.cache import LambdaCache, RingLambdaCache
from lcpatch.errors import RecipeError
from lcpatch.generation.compiled_forward import CompiledForward
from lcpatch.kernels.lambda_reference import lambda_attention_reference
from lcpatch.kernels.specs import LambdaSpec, Rotary, StepInfo

from naive_lambda import naive_logits
from tiny_models import CollectStreamer, random_ids, tiny_model

G, W = 4, 8
NEW = 20


def recipe(decode, method="lm-infinite", prefill_chunk=5, **generation):
    return {
        "attention": {"method": method, "n_global": G, "window": W},
        "generation": {"decode": decode, "prefill_chunk": prefill_chunk, **generation},
    }


def generate(model, decode, ids, method="lm-infinite", compile="auto", **kwargs):
    """Greedy by default; returns generate's output with raw logits and the cache it used."""
    options = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    with lcpatch.patched(model, recipe(decode, method, compile=compile)):
        return model.generate(ids, output_logits=True, **{**options, **kwargs})


def assert_same_run(fast, eager):
    assert isinstance(fast.past_key_values, RingLambdaCache)
    assert type(eager.past_key_values) is LambdaCache
    assert torch.equal(fast.sequences, eager.sequences)
    for a, b in zip(fast.logits, eager.logits, strict=True):
        assert (a - b).abs().max() <= 1e-4
    assert fast.past_key_values.get_seq_length() == eager.past_key_values.get_seq_length()


# Around and far past the window (8) and the prefill chunk (5): with 20 new tokens the ring wraps
# at many phases, during prefill and during decoding.
LENGTHS = [1, 2, 3, 5, 7, 8, 9, 12, 13, 17, 26, 40]


@torch.no_grad()
def test_static_equals_eager_and_naive_at_every_wraparound():
    model = tiny_model()
    for length in LENGTHS:
        ids = random_ids(length, seed=length)
        fast, eager = generate(model, "static", ids), generate(model, "eager", ids)
        assert_same_run(fast, eager)
        # The naive O(n²) reference scores the whole sequence in one pass: logits of every generated token.
        expected = naive_logits(model, fast.sequences, G, W, W)[0, length - 1 : -1]
        assert (torch.cat(fast.logits) - expected).abs().max() <= 1e-4, f"prompt of {length} tokens"


@pytest.mark.parametrize("family, method", [("llama", "streaming-llm"), ("gemma3", "lm-infinite")])
@torch.no_grad()
def test_static_equals_eager_other_rules_and_families(family, method):
    # streaming-llm's far rule; Gemma3's local layer keeps its own window and no sinks (n_global 0).
    model = tiny_model(family)
    for length in (3, 26):
        ids = random_ids(length, seed=length)
        assert_same_run(generate(model, "static", ids, method), generate(model, "eager", ids, method))


@torch.no_grad()
def test_sampling_same_tokens_with_a_fixed_seed():
    model = tiny_model()
    ids = random_ids(19)
    runs = []
    for decode in ("static", "eager"):
        torch.manual_seed(7)
        runs.append(generate(model, decode, ids, do_sample=True, temperature=0.8, top_k=30, top_p=0.9).sequences)
    assert torch.equal(*runs)


def left_padded(lengths):
    prompts = [random_ids(n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return prompts, ids, mask


@torch.no_grad()
def test_left_padded_batch_equals_eager_and_each_prompt_alone():
    model = tiny_model()
    prompts, ids, mask = left_padded([2, 11, 23])
    fast = generate(model, "static", ids, attention_mask=mask)
    assert_same_run(fast, generate(model, "eager", ids, attention_mask=mask))
    alone = generate(model, "static", prompts[0][None]).sequences  # the row that is mostly padding
    assert torch.equal(fast.sequences[0, ids.shape[1] :], alone[0, len(prompts[0]) :])


class StopAt(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@torch.no_grad()
def test_streamer_and_stopping_criteria_on_the_fast_path():
    model = tiny_model()
    prompt = random_ids(20)
    lcpatch.apply(model, recipe("static"))
    streamer = CollectStreamer()
    out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, streamer=streamer)
    assert streamer.tokens[-1] == "end" and len(streamer.tokens) == 14  # prompt, 12 tokens, end
    assert [t[0] for t in streamer.tokens[1:-1]] == out[0, 20:].tolist()
    stopper = StoppingCriteriaList([StopAt(26)])
    stopped = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, stopping_criteria=stopper)
    assert torch.equal(stopped, out[:, :26])
    eos = int(out[0, 24])  # as an end token; token 2 stays suppressed, as min_new_tokens did above
    ended = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, suppress_tokens=[2])
    assert int(ended[0, -1]) == eos and torch.equal(ended, out[:, : ended.shape[1]])
    lcpatch.remove(model)


@torch.no_grad()
def test_graph_on_cpu_falls_back_to_eager_with_one_note():
    model = tiny_model()
    ids = random_ids(12)
    eager = generate(model, "eager", ids).sequences
    lcpatch.apply(model, recipe("graph"))
    with pytest.warns(RuntimeWarning, match="'graph' but the model is on cpu, and CUDA graphs need a CUDA device"):
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    assert type(out.past_key_values) is LambdaCache and torch.equal(out.sequences, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per patched model
        model.generate(ids, max_new_tokens=3)
    lcpatch.remove(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto on a CPU: eager, silently
        with lcpatch.patched(model, recipe("auto")):
            assert (
                type(model.generate(ids, max_new_tokens=3, return_dict_in_generate=True).past_key_values) is LambdaCache
            )


@torch.no_grad()
def test_graph_with_a_method_without_fixed_size_cache_says_why():
    model = tiny_model()
    with lcpatch.patched(model, {"attention": {"method": "dense"}, "generation": {"decode": "static"}}):
        with pytest.warns(RuntimeWarning, match="attention method dense has no fixed-size cache"):
            model.generate(random_ids(10), max_new_tokens=3)


@pytest.mark.parametrize(
    "generation, names",
    [
        ({"decode": "fast"}, "generation.decode"),
        ({"decode": 1}, "generation.decode"),
        ({"progress": "yes"}, "progress"),
    ],
)
def test_recipe_fields_are_validated(generation, names):
    with pytest.raises(lcpatch.RecipeError) as info:
        lcpatch.load_recipe({"generation": generation})
    assert names in str(info.value)
    if "decode" in generation:
        assert "auto, eager, graph" in str(info.value)


def test_recipe_round_trips_the_new_fields():
    loaded = lcpatch.load_recipe(recipe("graph", progress=True))
    assert loaded.generation.decode == "graph" and loaded.generation.progress is True
    assert lcpatch.Recipe.from_yaml(loaded.to_yaml()) == loaded
    assert lcpatch.load_recipe("lm-infinite").generation.decode == "auto"


@torch.no_grad()
def test_remove_restores_forward_generate_and_logits():
    model = tiny_model()
    ids = random_ids(30)
    before = model(ids).logits
    lcpatch.apply(model, recipe("static"))
    assert "forward" in model.__dict__
    generate_out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True)
    assert isinstance(generate_out.past_key_values, RingLambdaCache)
    lcpatch.remove(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert torch.equal(model(ids).logits, before)
    assert type(model(ids, use_cache=True).past_key_values).__name__ == "DynamicCache"


@torch.no_grad()
def test_chunked_prefill_streams_chunks_and_computes_last_logits_only():
    model = tiny_model()
    chunks, logit_rows, progress = [], [], []
    model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: chunks.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    model.lm_head.register_forward_hook(lambda m, args, out: logit_rows.append(out.shape[1]))
    with lcpatch.patched(model, recipe("static", prefill_chunk=16)):
        model.generate(random_ids(100), max_new_tokens=3, prefill_progress=lambda *p: progress.append(p))
    assert max(chunks) == 16 and sum(chunks[:7]) == 100  # 6 chunks here, the 7th in generate(), then decode
    assert logit_rows == [1, 1, 1]  # the LM head never sees more than the last token
    assert progress == [(done, 84) for done in (4, 20, 36, 52, 68, 84)]  # chunks end where the prompt ends


@torch.no_grad()
def test_progress_bar_from_the_recipe(capsys):
    model = tiny_model()
    with lcpatch.patched(model, recipe("static", prefill_chunk=16, progress=True)):
        model.generate(random_ids(70), max_new_tokens=2)
    assert "lcpatch prefill" in capsys.readouterr().err


@pytest.mark.parametrize("batch", [1, 3])
def test_reference_ignores_slot_order_given_positions(batch):
    # A ring buffer holds the window in rotated slot order: attention must go by positions alone.
    torch.manual_seed(0)
    spec, rotary = LambdaSpec(G, W, 12), Rotary(1.0 / (10000 ** (torch.arange(0, 16, 2) / 16.0)))
    slots, q_pos = G + W, 40
    positions = torch.cat((torch.arange(G), torch.arange(q_pos - W + 1, q_pos + 1))).expand(batch, -1)
    valid = torch.ones(batch, slots, dtype=torch.bool)
    valid[0, 1] = False
    q = torch.randn(batch, 4, 1, 16)
    k, v = torch.randn(batch, 2, slots, 16), torch.randn(batch, 2, slots, 16)
    args = (spec, rotary, 0.25)
    ordered = lambda_attention_reference(q, k, v, positions[:, -1:], positions, valid, *args)
    perm = torch.randperm(slots)
    shuffled = lambda_attention_reference(
        q,
        k[:, :, perm],
        v[:, :, perm],
        positions[:, -1:],
        positions[:, perm],
        valid[:, perm],
        *args,
        keys_in_stream_order=False,
    )
    assert (ordered - shuffled).abs().max() <= 1e-5


@pytest.mark.parametrize("max_distance", [12, None], ids=["lm-infinite", "streaming-llm"])
def test_reference_takes_the_window_stored_rotated(max_distance):
    """RingLambdaCache stores its window rotated (`rotated_from`): the same output as the keys un-rotated,
    a million positions in (where fp32 angles would be off by ~0.06 rad)."""
    torch.manual_seed(0)
    spec, rotary = LambdaSpec(G, W, max_distance), Rotary(1.0 / (10000 ** (torch.arange(0, 16, 2) / 16.0)), 1.2)
    q_pos = 1_000_003
    positions = torch.cat((torch.arange(G), torch.arange(q_pos - W + 1, q_pos + 1))).expand(2, -1)
    valid = torch.ones(2, G + W, dtype=torch.bool)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, G + W, 16), torch.randn(2, 2, G + W, 16)
    stored = torch.cat((k[:, :, :G], rotary.rotate_stored(k[:, :, G:], positions[:, G:])), dim=2)
    args = (positions[:, -1:], positions, valid, spec, rotary, 0.25)
    plain = lambda_attention_reference(q, k, v, *args)
    from_stored = lambda_attention_reference(q, stored, v, *args, keys_in_stream_order=False, rotated_from=G)
    assert (plain - from_stored).abs().max() <= 1e-5


def test_ring_stores_the_window_rotated_and_gives_chunks_it_back():
    """Decode steps read the window as stored, rotated at each key's position; a prefill chunk gets the
    keys un-rotated, as LambdaCache gives them."""
    torch.manual_seed(0)
    spec, rotary = LambdaSpec(G, W, 12), Rotary(1.0 / (10000 ** (torch.arange(0, 16, 2) / 16.0)), 1.2)
    ring, eager = RingLambdaCache([spec], [rotary], TORCH.rotate_stored, TORCH.write_ring_token), LambdaCache([spec])

    def update(cache, start, length):
        positions = torch.arange(start, start + length)[None]
        cache.step = StepInfo(positions, torch.ones_like(positions, dtype=torch.bool))
        gen = torch.Generator().manual_seed(start)
        k, v = (torch.randn(1, 2, length, 16, generator=gen) for _ in range(2))
        return cache.layers[0].update(k, v), cache.layers[0]

    for cache in (ring, eager):
        update(cache, 0, 11)
    (ring_keys, _), layer = update(ring, 11, 5)
    (eager_keys, _), _ = update(eager, 11, 5)
    assert layer.rotated_from is None and torch.allclose(ring_keys, eager_keys, atol=1e-5)
    assert torch.equal(layer.key_positions, eager.layers[0].key_positions)
    (keys, _), layer = update(ring, 16, 1)
    assert layer.rotated_from == G and keys is layer.key_buffer
    window = torch.arange(G, G + W)
    eager_window = eager.layers[0].keys[:, :, -W + 1 :]  # positions 9..15, and the new token at 16
    held = {int(p): s for s, p in zip(window.tolist(), layer.slot_positions[0, G:].tolist(), strict=True)}
    slots = torch.tensor([held[p] for p in range(9, 16)])
    stored = rotary.rotate_stored(eager_window, torch.arange(9, 16)[None])
    assert torch.allclose(keys[:, :, slots], stored, atol=1e-5)
    assert torch.equal(keys[:, :, :G], eager.layers[0].sink_keys)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@torch.no_grad()
def test_graph_is_captured_and_replays_the_static_step():
    model = tiny_model(hidden_size=256, head_dim=64).cuda()  # head_dim 64: the Triton decode kernel
    prompts, ids, mask = left_padded([3, 17, 40])
    ids, mask = ids.cuda(), mask.cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = generate(model, "graph", ids, attention_mask=mask, compile=False)
    assert not [w for w in caught if "lcpatch" in str(w.message)]
    assert graph.past_key_values.decode_step.graph is not None
    static = generate(model, "static", ids, attention_mask=mask)
    assert torch.equal(graph.sequences, static.sequences)
    assert all(torch.equal(a, b) for a, b in zip(graph.logits, static.logits, strict=True))
    assert_same_run(graph, generate(model, "eager", ids, attention_mask=mask))


@pytest.mark.parametrize("method", ["lm-infinite", "streaming-llm"])
@torch.no_grad()
def test_compiled_step_decodes_the_eager_tokens(method):
    """generation.compile: true runs the step through torch.compile (inductor's CPU code here); tokens and
    logits are eager's, over ring wraparounds and a left-padded batch, and a second generate() reuses the
    compiled code."""
    model = tiny_model(num_hidden_layers=3)
    _, ids, mask = left_padded([3, 17, 40])
    eager = generate(model, "eager", ids, method, attention_mask=mask)
    with lcpatch.patched(model, recipe("static", method, compile=True)):
        options = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        runs = [model.generate(ids, attention_mask=mask, output_logits=True, **options) for _ in range(2)]
    for run in runs:
        assert isinstance(run.past_key_values.decode_step.forward, CompiledForward)
        assert isinstance(run.past_key_values.prefill_forward, CompiledForward)  # 7 chunks of 5 streamed
        assert_same_run(run, eager)
    assert runs[0].past_key_values.decode_step.forward is runs[1].past_key_values.decode_step.forward
    assert runs[0].past_key_values.prefill_forward is runs[1].past_key_values.prefill_forward


@torch.no_grad()
def test_compiled_prefill_serves_every_prompt_length_without_recompiling_each():
    """The prefill's chunks go through the compiled decoder: a second prompt length (another first chunk,
    another mask length per chunk) compiles code for any length, which later lengths reuse."""
    from torch._dynamo.utils import counters

    model = tiny_model(num_hidden_layers=3)
    graphs = [counters["stats"]["unique_graphs"]]
    with lcpatch.patched(model, recipe("static", compile=True)):
        for length in (23, 31, 44, 58):
            model.generate(random_ids(length), max_new_tokens=2, do_sample=False)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] < graphs[1] < graphs[2] == graphs[3] == graphs[4], graphs


@torch.no_grad()
def test_compiled_step_serves_every_batch_size_without_recompiling_each():
    """The second batch size compiles a step for any batch; later sizes reuse it (a compile per size and
    layer would exhaust dynamo's recompile limit by the fourth size and leave the layers past it eager)."""
    from torch._dynamo.utils import counters

    model = tiny_model(num_hidden_layers=3)
    graphs = []
    with lcpatch.patched(model, recipe("static", compile=True)):
        for batch in (1, 2, 3, 4, 5):
            model.generate(random_ids(9, batch=batch), max_new_tokens=3, do_sample=False)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0] and graphs[2] == graphs[3] == graphs[4] == graphs[1]


@pytest.mark.parametrize(("decode", "compile", "compiled"), [("static", "auto", False), ("static", False, False)])
def test_compile_auto_compiles_only_captured_steps(decode, compile, compiled):
    model = tiny_model()
    with torch.no_grad(), lcpatch.patched(model, recipe(decode, compile=compile)):
        out = model.generate(random_ids(5), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values.decode_step.forward, CompiledForward) is compiled


def test_bad_compile_setting_names_the_choices():
    with pytest.raises(RecipeError, match=r"generation.compile must be auto, true or false; got 'yes'"):
        lcpatch.load_recipe(recipe("graph", compile="yes"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@torch.no_grad()
def test_compiled_graph_decodes_the_eager_tokens_at_real_size():
    """The captured, compiled step (decode: graph, compile: auto; Triton kernels, the fused ring write) on
    Llama-3-8B's layer shape: eager decoding's tokens for a left-padded batch. In float32, so that the
    paths' rounding differences (~1e-6) cannot decide a greedy choice; a step where eager's two best logits
    are closer than that ends the comparison of its row (a tie either way is right), and most steps count."""
    model, _, _ = load_model("llama3-8b", 2, torch.device("cuda"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 300), generator=generator).cuda()
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    spec = {"attention": {"method": "lm-infinite", "n_global": 10, "window": 128}}
    runs = {}
    for decode in ("eager", "graph"):
        with lcpatch.patched(model, spec | {"generation": {"decode": decode}}):
            runs[decode] = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=40,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
    step = runs["graph"].past_key_values.decode_step
    assert step.graph is not None and isinstance(step.forward, CompiledForward)
    compared = 0
    for row in range(2):
        for t, logits in enumerate(runs["eager"].logits):
            top = logits[row].topk(2).values
            if top[0] - top[1] < 1e-4:
                break
            assert runs["graph"].sequences[row, 300 + t] == runs["eager"].sequences[row, 300 + t], (row, t)
            compared += 1
    assert compared >= 60


@torch.no_grad()
def test_prefill_chunk_positions_are_shared_by_the_layers_of_a_spec():
    """Every layer of one Λ rule attends a prefill chunk's keys at the same positions: one tensor for all of
    them (flash-attention's layout, read on the host, is then found once per chunk), and eager's values."""
    model = tiny_model(num_hidden_layers=3)
    ids = random_ids(23)
    fast, eager = (generate(model, decode, ids, max_new_tokens=1, min_new_tokens=1) for decode in ("static", "eager"))
    layers = fast.past_key_values.layers
    assert layers[0].key_positions is layers[1].key_positions is layers[2].key_positions
    assert layers[0].key_valid is layers[2].key_valid
    # The last chunk's keys (generate's own pass over the prompt's last 5 tokens), as LambdaCache lays them out.
    assert torch.equal(layers[1].key_positions, eager.past_key_values.layers[1].key_positions)
    assert torch.equal(layers[1].key_valid, eager.past_key_values.layers[1].key_valid)


@torch.no_grad()
def test_ring_layers_of_a_spec_count_their_tokens_once():
    """Layers of one Λ rule store the same tokens: they share one count on the device, which the last of them
    advances, once per chunk and decode step rather than once per layer (a launch each)."""
    model = tiny_model(num_hidden_layers=4)
    layers = generate(model, "static", random_ids(23)).past_key_values.layers
    assert all(layer.written is layers[0].written for layer in layers)
    assert [layer.last_of_spec for layer in layers] == [False, False, False, True]
    assert layers[0].written.item() == layers[0].cumulative_length == 23 + NEW - 1
    # Interleaved rules (a local layer between two global ones): a count per rule.
    specs = [LambdaSpec(G, W, W), LambdaSpec(0, 4, 4), LambdaSpec(G, W, W)]
    ring = RingLambdaCache(specs, [Rotary(torch.ones(8), 1.0)] * 3, TORCH.rotate_stored, TORCH.write_ring_token)
    assert [(layer.first_of_spec, layer.last_of_spec) for layer in ring.layers] == [(1, 0), (1, 1), (0, 1)]


@torch.no_grad()
def test_a_first_chunk_longer_than_the_window_finds_its_globals_next_to_the_sinks():
    """The ring's empty slots are left out of a prefill chunk's keys (LambdaCache's layout), so a first chunk
    longer than the window has its global tokens right after the sink slots: flash-attention's global part
    scores every slot up to the last global in one tile (P_PAD), which 8,212 slots on Llama-3-8B's lm-infinite
    made too large to compile on an H100."""
    from lcpatch.kernels.lambda_flash import find_layout

    model = tiny_model(num_hidden_layers=2)
    ids = random_ids(3 * W + 3)
    with lcpatch.patched(model, recipe("static", prefill_chunk=2 * W + 1)):
        out = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    assert layer.key_positions.shape[1] == G + W + 2 * W + 1  # the second chunk: sinks, the full ring, itself
    positions, valid = torch.arange(2 * W + 2)[None], torch.ones(1, 2 * W + 2, dtype=torch.bool)
    step = StepInfo(positions, valid)
    ring = RingLambdaCache(
        [LambdaSpec(G, W, W)], [Rotary(torch.ones(8), 1.0)], TORCH.rotate_stored, TORCH.write_ring_token
    )
    ring.step = step
    keys = torch.zeros(1, 1, 2 * W + 2, 16)
    ring.layers[0].update(keys, keys)  # the first chunk, into an empty ring
    first = ring.layers[0]
    assert torch.equal(first.key_positions[0, G:], positions[0])
    assert find_layout(positions, first.key_positions, first.key_valid, LambdaSpec(G, W, W)).prefix == 2 * G
