"""Before-generate hooks: one `generate` replacement runs every registered hook, in `ORDER`, around the
whole call; E2-LLM registers one instead of wrapping generate, and remove() unregisters it."""

from __future__ import annotations

import contextlib

import pytest

import lcpatch
from lcpatch._compat import CACHE_ARG
from lcpatch.generation import hooks, register_before_generate
from lcpatch.patching import PatchLog

from tiny_models import random_ids, tiny_model


def _noop(args, kwargs):
    return contextlib.nullcontext()


def test_hooks_run_in_order_around_the_whole_call_on_the_callers_arguments(monkeypatch):
    monkeypatch.setattr(hooks, "ORDER", ("first", "second"))
    events = []

    def hook(name):
        @contextlib.contextmanager
        def run(args, kwargs):
            events.append((f"enter {name}", kwargs["max_new_tokens"], CACHE_ARG in kwargs))
            yield
            events.append((f"exit {name}",))

        return run

    model = tiny_model()
    with lcpatch.patched(model, "lm-infinite"):
        log = PatchLog()
        register_before_generate(model, "second", hook("second"), log)
        register_before_generate(model, "first", hook("first"), log)
        model.generate(random_ids(8), max_new_tokens=2, do_sample=False)
        log.undo()
        model.generate(random_ids(8), max_new_tokens=2, do_sample=False)
    assert events == [("enter first", 2, False), ("enter second", 2, False), ("exit second",), ("exit first",)]


def test_e2llm_registers_a_hook_instead_of_wrapping_generate():
    model = tiny_model()
    with lcpatch.patched(model, {"rope": {"scaling": "e2llm"}}):
        assert model.generate.__wrapped__.__func__ is type(model).generate  # one replacement, nothing stacked
        with pytest.raises(ValueError, match="already registered"):
            register_before_generate(model, "e2llm-length", _noop, PatchLog())
    log = PatchLog()
    register_before_generate(model, "e2llm-length", _noop, log)  # remove() unregistered E2-LLM's hook
    log.undo()


def test_an_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown before-generate stage"):
        register_before_generate(tiny_model(), "later", _noop, PatchLog())
