"""check_policy inside the user's own @given: it draws from the outer test's data, which shrinks
them with its own arguments; runs in an outer @example; needs the outer test's deadline off; and
compiles once while the same model, unchanged, comes back with the same policy (hypothesis calls
the outer test for every example and shrink step: a failure recompiled the model 106 times)."""
from __future__ import annotations

import datetime

import pytest
import torch
from hypothesis import Phase, example, given, settings, strategies as st

from slimfx import api
from slimfx.models import tiny
from slimfx.testing import Draw, PolicyCheckError, check_policy

from policy_check_tiny import llama, quantize  # noqa: F401 - fixtures


@pytest.fixture
def compiles(monkeypatch):
    """How many times check_policy compiled."""
    count = [0]
    real = api.compile

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "compile", counted)
    return count


def test_runs_inside_an_outer_given(llama):
    seen = []

    @settings(max_examples=3, deadline=None, database=None)
    @given(st.sampled_from(["int8", "fp16", "bf16"]))
    def outer(fmt):
        seen.append(len(check_policy(llama, quantize(fmt), rtol=0, atol=0.02, max_examples=3).results))

    outer()
    assert seen and all(n == 3 for n in seen)


def test_runs_in_an_explicit_example_of_the_outer_test(llama):
    """An @example runs on data with no choices: drawing from it stopped the test (StopTest, then
    hypothesis' Frozen)."""
    seen = []

    @settings(max_examples=1, deadline=None, database=None)
    @given(st.sampled_from(["int8", "fp16"]))
    @example("int8")
    def outer(fmt):
        seen.append(check_policy(llama, quantize(fmt), rtol=0, atol=0.02, max_examples=3).draws)

    outer()
    assert len(seen) == 2 and len(seen[0]) == 3
    assert seen[0][0] == Draw(batch=1, seq=1, padding="none", pads=(0,), seed=0)  # the simplest input first


def test_failure_inside_an_outer_given_is_shrunk_by_it(llama):
    # No explain phase: it reruns the outer test (a compile each) dozens of times.
    @settings(max_examples=3, deadline=None, database=None, phases=[Phase.generate, Phase.shrink])
    @given(st.sampled_from(["int2 group=16", "int2 group=32"]))
    def outer(fmt):
        check_policy(llama, quantize(fmt), rtol=0, atol=1e-3, max_examples=3)

    with pytest.raises(PolicyCheckError, match="smallest failing input: batch=1, seq=1, padding=none") as info:
        outer()
    # It said "(1 inputs run, shrinking included)": the count is of this call, the shrinking the outer test's.
    assert "inputs run in this call; the outer test shrinks them with its own arguments" in str(info.value)


def test_a_failure_shrunk_by_the_outer_test_compiles_the_model_once(compiles):
    model = tiny("llama")  # its own instance: no earlier test's compile to reuse
    calls = [0]

    @settings(max_examples=4, deadline=None, database=None, phases=[Phase.generate, Phase.shrink])
    @given(st.integers(0, 3))
    def outer(_):
        calls[0] += 1
        check_policy(model, quantize("int2 group=16"), rtol=0, atol=1e-3, max_examples=3)

    with pytest.raises(PolicyCheckError, match="smallest failing input: batch=1, seq=1"):
        outer()
    assert calls[0] > 3 and compiles[0] == 1, (calls, compiles)


def test_a_changed_model_or_policy_is_compiled_again(compiles):
    model = tiny("llama")

    @settings(max_examples=1, deadline=None, database=None)
    @given(st.just(0))
    def outer(_):
        check_policy(model, quantize("int8"), rtol=0, atol=0.02, max_examples=2)
        check_policy(model, quantize("int8"), rtol=0, atol=0.02, max_examples=2)
        assert compiles[0] == 1
        check_policy(model, quantize("fp16"), rtol=0, atol=0.02, max_examples=2)
        assert compiles[0] == 2
        with torch.no_grad():  # an in-place change of a weight: another model
            model.model.lm_head.weight.mul_(1.5)
        # passes only against a compile of the changed model: the stale one's logits are 1.5x off
        check_policy(model, quantize("fp16"), rtol=0, atol=0.02, max_examples=2)
        assert compiles[0] == 3
        # `.data =` and a new submodule keep every version number: compiled again all the same
        head = model.model.lm_head
        head.weight.data = head.weight.detach() * 2
        check_policy(model, quantize("fp16"), rtol=0, atol=0.02, max_examples=2)
        assert compiles[0] == 4
        model.model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        check_policy(model, quantize("fp16"), rtol=0, atol=0.02, max_examples=2)
        assert compiles[0] == 5

    outer()


def test_an_outer_test_with_a_deadline_is_refused_before_compiling(llama, compiles):
    @settings(max_examples=2, deadline=datetime.timedelta(seconds=30), database=None)
    @given(st.just(0))
    def outer(_):
        check_policy(llama, quantize("int8"), rtol=0, atol=0.02, max_examples=2)

    with pytest.raises(ValueError, match=r"needs the test's deadline off \(it is 0:00:30\).*"
                                         r"add @settings\(deadline=None\)"):
        outer()
    assert compiles[0] == 0


def test_a_seed_inside_an_outer_given_is_said_to_have_no_effect(llama):
    """The draws follow the outer test's data: seed=5 was ignored, and nothing said so."""
    @settings(max_examples=1, deadline=None, database=None)
    @given(st.integers(0, 9))
    def outer(_):
        with pytest.warns(UserWarning, match=r"seed=…\) has no effect inside a hypothesis test.*@hypothesis.seed"):
            check_policy(llama, quantize("int8"), rtol=0, atol=0.02, max_examples=1, seed=5)

    outer()
