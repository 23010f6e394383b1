"""slimfx.testing.role_rules: rules that bind on supported models. Every draw parses; on tiny
models most draws compile (grammar-drawn policies() text compiled about 1 draw in 20) and the
rest are SpecErrors, never another exception; every rule kind and the options that cost
nothing to run are drawn."""
from __future__ import annotations

import collections
import re

import pytest
from hypothesis import HealthCheck, given, settings

import slimfx
from slimfx.models import tiny
from slimfx.testing import role_rules

_MODELS: dict[str, object] = {}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(role_rules(blocks=4))
def test_every_draw_parses_as_bare_rules(rules):
    slimfx.parse(rules, bare=True)


def test_three_blocks_the_least_the_docstring_allows_draw_only_rules_that_fit():
    """role_rules(blocks=3) crashed about 1 draw in 50 (InvalidArgument: max_value=-1): `drop
    blocks[0:2]` left one block, and a token rule after it asked for an index below it."""
    seen = collections.Counter()

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(role_rules(blocks=3))
    def run(rules):
        lines = rules.splitlines()
        removes_two = lines[0].startswith("drop blocks[0:2]")
        seen["removes two"] += removes_two
        seen["and a token rule"] += removes_two and any(line.startswith("tokens") for line in lines)
        after = [int(i) for i in re.findall(r"tokens after blocks\[(\d+)\]", rules)]
        assert all(i < 3 - 2 * removes_two - 1 for i in after), rules  # never after the last block left

    run()
    assert seen["and a token rule"], seen  # the case that crashed was drawn


@pytest.mark.parametrize("arch, tokens, fused", [("llama", False, False), ("bert", True, False), ("gpt2", False, True)])
def test_most_draws_compile_and_the_rest_are_spec_errors(arch, tokens, fused):
    """GPT-2 with fused_qkv=True: its attn.q refused 3 draws in 10, and its fused c_attn was
    never drawn."""
    model = _MODELS.setdefault(arch, tiny(arch, layers=4))
    outcomes = collections.Counter()

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(role_rules(blocks=4, tokens=tokens, fused_qkv=fused))
    def run(rules):
        try:
            slimfx.compile(model, rules, progress=False)
            outcomes["compiled"] += 1
            outcomes["qkv compiled"] += "attn.qkv" in rules
        except slimfx.SpecError:
            outcomes["refused"] += 1

    run()
    assert outcomes["compiled"] >= 0.6 * sum(outcomes.values()), outcomes
    assert bool(outcomes["qkv compiled"]) == fused, outcomes


def test_adapter_ranks_fit_the_tiny_models_linears():
    """`adapt head lora` drew ranks up to 64 (ViT's classifier has 3 outputs: 341 draws in 3,000
    refused) and `attn.k` rank 40 (a GQA key projection has 32)."""
    ranks = collections.defaultdict(set)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(role_rules(blocks=4))
    def run(rules):
        for sel, rank in re.findall(r"^adapt (\S+) \w+ rank=(\d+)", rules, re.M):
            ranks[sel == "head"].add(int(rank))

    run()
    assert ranks[True] and max(ranks[True]) <= 2 and ranks[False] and max(ranks[False]) <= 16, ranks


def test_a_failure_shrinks_to_the_rules_it_needs():
    """Parts were drawn before their rules: a shrink that dropped a part shifted the later rules'
    draws, and a failure needing `init=error` kept five rules."""
    from hypothesis import find

    found = find(role_rules(blocks=4), lambda r: "init=error" in r,
                 settings=settings(database=None, derandomize=True, max_examples=2000))
    assert len(found.splitlines()) == 2, found  # the quantize and the adapter on it


def test_no_draw_asks_for_what_no_model_gives():
    """A tiny Llama refused 5 draws in 60 (README said 60 of 60): budgets at a format's nominal
    bits (`avg_bits<=4` over int4, whose group scales make 4.25 its least) and `fold=true` after a
    removal of blocks[0] or an auto search (no block before the gap to fold into)."""
    model = _MODELS.setdefault("llama", tiny("llama", layers=4))
    kinds = collections.Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(role_rules(blocks=4, tokens=False))
    def run(rules):
        if "fold=true" in rules:
            kinds["fold"] += 1
            assert not re.search(r"blocks\[0[]:]|auto", rules.splitlines()[0]), rules
        if "budget" in rules:
            kinds["budget"] += 1
            slimfx.plan(model, rules)  # a budget no choice can meet is a SpecError here, as in compile

    run()
    assert kinds["fold"] and kinds["budget"], kinds


def test_every_rule_kind_and_the_adapter_and_gptq_options_are_drawn():
    seen = collections.Counter()

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(role_rules(blocks=5, max_rules=6))
    def count(rules):
        for line in rules.splitlines():
            seen[line.split()[0] if line.split()[0] != "tokens" else " ".join(line.split()[:2])] += 1
            seen.update(re.findall(r"(\w+)=", line))
            seen.update(w for w in ("auto", "dora", "fisher") if w in line)

    count()
    for kind in ("drop", "collapse", "heal", "quantize", "adapt", "precision", "keep", "tokens unpad", "tokens after"):
        assert seen[kind], (kind, seen)
    for option in ("method", "group", "zero", "act_order", "refit", "init", "dtype", "dropout", "fold", "steps",
                   "distill", "ratio", "keep", "auto", "dora", "fisher"):
        assert seen[option], (option, seen)


@pytest.mark.parametrize("kwargs, message", [
    ({"blocks": 2}, "at least 3 blocks"), ({"blocks": True}, "at least 3 blocks"),
    ({"max_rules": 0}, "max_rules must be a whole number of at least 1"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        role_rules(**kwargs)


def test_numpy_whole_numbers_are_taken():
    """np.int64(4) was refused as "at least 3 blocks … got blocks=np.int64(4)"."""
    import numpy as np

    from slimfx.testing import tiny_models

    role_rules(blocks=np.int64(4), max_rules=np.int64(2))
    tiny_models(max_layers=np.int64(3))
