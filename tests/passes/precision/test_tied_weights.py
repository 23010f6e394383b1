"""A weight two linears share (tied): quantizing both leaves no fp32 original behind (it stayed as
dead bytes, counted and saved, with a note saying the opposite); quantizing one keeps it for the
other and says so once (it was said twice). A linear called twice on different inputs is encoded
by GPTQ on both inputs' rows, whichever sweep runs (the block sweeps took the first call's, the
one-pass calibration both: mutation audit M36), and a linear reading one of them only that one's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimfx
from slimfx.passes.precision.gptq import gptq
from slimfx.runtime.formats import QuantFormat, dequantize, quantize_rtn


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.c, self.c2 = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32)
        self.c2.weight = self.c.weight

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.c(h) + self.c2(h)


def _rounded(model: nn.Module, names) -> nn.Module:
    """The model with each named linear's weight replaced by its int8 RTN round trip."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            w = getattr(ref, name).weight
            w.copy_(dequantize(quantize_rtn(w.detach(), QuantFormat(8))).to(w.dtype))
    return ref


def test_quantizing_every_sharer_frees_the_original(tmp_path):
    model, x = Shared().eval(), torch.randn(4, 64)
    cm = slimfx.compile(model, "quantize ** : Linear int8", example_inputs={"x": x}, backend="eager")
    assert [n for n, _ in cm.program.named_parameters()] == ["up.bias", "c.bias", "c2.bias"]
    # no "not freed" note; the two packed copies are said (they were stored without a word)
    assert [n for r in cm.report.rules for n in r.notes if "tied" in n] == [
        "c, c2 share one weight (tied): it is stored as 2 packed copies, one per linear, each encoded for that linear"]
    assert {n for n, _ in cm.program.named_buffers()} >= {"c.qweight", "c2.qweight"}
    with torch.no_grad():
        torch.testing.assert_close(cm(x), _rounded(model, ["up", "c"])(x), atol=1e-5, rtol=1e-5)
    cm.save(tmp_path / "a")
    assert [n for n, _ in slimfx.load(tmp_path / "a").program.named_parameters()] == ["up.bias", "c.bias", "c2.bias"]


@pytest.mark.parametrize("rule", ["quantize {c,c2} int8",
                                  "precision {c,c2} choose {int8, int4} budget avg_bits<=6 by output_mse"])
def test_a_tied_weight_is_counted_once_before_in_the_rule_row_and_the_plan(rule):
    """The rule's row added each linear's view of the one weight: 16 KiB before for a model that
    held 8 KiB there, a saving of 4× shown where it was 2×. After, each linear's packed copy counts."""
    model, x = Shared().eval(), torch.randn(4, 64)
    weight, biases = 32 * 64, 2 * 32
    planned = slimfx.plan(model, rule, example_inputs={"x": x}).rules[0].estimate
    row = slimfx.compile(model, rule, example_inputs={"x": x}, calib=[{"x": torch.randn(8, 64)}],
                         backend="eager").report.rules[0]
    for params, nbytes in ((planned.params_before, planned.bytes_before), (row.params_before, row.bytes_before)):
        assert (params, nbytes) == (weight + biases, 4 * (weight + biases))
    assert row.params_after == 2 * weight + biases == planned.params_after  # two packed copies


def test_the_rule_row_counts_the_targets_weights_alone_as_plan_does():
    """An adapter on the linear (an earlier rule) counted in "before" (36,864 bytes for 32,768, a
    saving shown larger than it was); a head tied to the embedding, quantized alone, counted the
    embedding's kept original in "params after" (32,768 where plan said 16,384)."""
    from slimfx.models import tiny

    for arch, rules in (("llama", "adapt blocks.*.attn.q lora rank=4\nquantize blocks.*.attn.q int8"),
                        ("gpt2", "quantize head int8")):
        lm = tiny(arch)
        planned = slimfx.plan(lm, rules).rules[-1].estimate
        row = slimfx.compile(lm, rules).report.rules[-1]
        assert (row.params_before, row.bytes_before) == (planned.params_before, planned.bytes_before), arch
        assert row.params_after == planned.params_after == planned.params_before, arch


def test_quantizing_one_sharer_keeps_the_original_for_the_other_and_says_so_once():
    model, x = Shared().eval(), torch.randn(4, 64)
    cm = slimfx.compile(model, "quantize c : Linear int8", example_inputs={"x": x}, backend="eager")
    notes = [n for n in cm.report.rules[0].notes if "tied" in n]
    assert len(notes) == 1 and "not freed" in notes[0]
    assert "c.weight" in dict(cm.program.named_parameters())
    ref = _rounded(model, [])
    with torch.no_grad():  # c reads the rounded weight, c2 the original
        h = torch.relu(ref.up(x))
        w = dequantize(quantize_rtn(ref.c.weight.detach(), QuantFormat(8)))
        torch.testing.assert_close(cm(x), h @ w.T + ref.c.bias + ref.c2(h), atol=1e-5, rtol=1e-5)


def test_every_tied_target_a_rule_leaves_shared_is_named():
    """The note named only the first tied target."""
    class TwoPairs(Shared):
        def __init__(self):
            super().__init__()
            self.d, self.d2 = nn.Linear(64, 32), nn.Linear(64, 32)
            self.d2.weight = self.d.weight

        def forward(self, x):
            h = torch.relu(self.up(x))
            return self.c(h) + self.c2(h) + self.d(h) + self.d2(h)

    model, x = TwoPairs().eval(), torch.randn(4, 64)
    cm = slimfx.compile(model, "quantize {c, d} : Linear int8", example_inputs={"x": x}, backend="eager")
    notes = [n for n in cm.report.rules[0].notes if "tied" in n]
    assert notes == ["c.weight, d.weight: tied to another module's weight, which keeps the original "
                     "(its memory is not freed)"]


def test_sharers_rewritten_by_two_rules_free_the_original_after_the_second(tmp_path):
    """The first rule keeps the weight for the other sharer; the second frees it under both names
    (freeing one name left the other dangling: a LintError)."""
    model, x = Shared().eval(), torch.randn(4, 64)
    for rules in ("quantize c : Linear int8\nquantize c2 : Linear int8", "quantize c2 : Linear int8\nquantize c : Linear int8"):
        cm = slimfx.compile(model, rules, example_inputs={"x": x}, backend="eager")
        assert [n for n, _ in cm.program.named_parameters() if n.endswith(".weight")] == ["up.weight"]
        first, second = cm.report.rules
        assert any("not freed" in n for n in first.notes) and not any("tied" in n for n in second.notes)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), _rounded(model, ["c"])(x), atol=1e-5, rtol=1e-5)
        cm.save(tmp_path / "a")
        with torch.no_grad():
            assert torch.equal(slimfx.load(tmp_path / "a", backend="eager")(x), cm(x))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.c, self.d = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.c(h) + self.c(2 * h + 1) + self.d(h)


@pytest.mark.parametrize("sweep", ["sequential=false", "sequential=true", "true_sequential=true"])
def test_a_linear_called_twice_is_encoded_on_both_inputs(sweep):
    model = CalledTwice().eval()
    gen = torch.Generator().manual_seed(1)
    calib = [{"x": torch.randn(2, 8, 32, generator=gen)} for _ in range(3)]
    cm = slimfx.compile(model, f"quantize {{c, d}} : Linear int4 group=16 method=gptq {sweep}",
                        example_inputs=calib[0], calib=calib, backend="eager")
    with torch.no_grad():  # the inputs written here: c reads h and 2h + 1, d reads h
        h = torch.cat([torch.relu(model.up(b["x"])).reshape(-1, 32) for b in calib]).double()
    both = torch.cat([h, 2 * h + 1])
    fmt = QuantFormat(4, 16, True)
    for name, rows in (("c", both), ("d", h)):
        want = gptq(getattr(model, name).weight.detach(), rows.T @ rows / len(rows), fmt)
        assert torch.equal(cm.program.get_submodule(name).qweight, want.qweight), name


def test_a_linear_called_twice_with_an_error_fitted_adapter_is_refused_at_the_rule():
    """The fit pairs one input's rows with the original model's: a raw PassError before."""
    model = CalledTwice().eval()
    calib = [{"x": torch.randn(2, 8, 32)} for _ in range(2)]
    with pytest.raises(slimfx.SpecError) as info:
        slimfx.compile(model, "quantize c : Linear int4 group=16 method=gptq\nadapt c lora rank=2 init=error",
                       example_inputs=calib[0], calib=calib, backend="eager")
    e = info.value
    assert e.kind == "unsupported" and e.line == 1 and "c is called at 2 places" in e.message
    assert "init=gaussian" in e.hint
