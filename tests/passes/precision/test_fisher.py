"""`precision … by fisher` (passes/precision/fisher.py): the per-output loss sensitivities against
gradients taken here with hooks on the Hugging Face model, the weighted error against a sum over
calibration rows, the rule end to end, and the refusal on a model without a language-model loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimfx
from slimfx import SpecError
from slimfx.models import tiny
from slimfx.passes.precision.fisher import output_fisher, weighted_error
from slimfx.passes.rewrite import find_sites

from slimfx.runtime.formats import QuantFormat, dequantize, quantize_rtn

from passes_tiny import captured, linear_input_hessians


def _calib(n=2, rows=2, length=10, seed=0, pad=True):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(rows, length, dtype=torch.long)
        if pad:
            mask[1, -3:] = 0  # padding: not a token the loss or F counts
        out.append({"input_ids": torch.randint(3, 256, (rows, length), generator=gen), "attention_mask": mask})
    return out


def _hf_fisher(model, batches) -> dict[str, torch.Tensor]:
    """Mean over real tokens of (∂L/∂y)² at every block linear's output, L the mean next-token
    cross entropy over real tokens, written here on the HF modules."""
    sums, tokens = {}, 0
    flags = [p.requires_grad for p in model.parameters()]
    for batch in batches:
        outs, hooks = {}, []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                hooks.append(m.register_forward_hook(lambda mod, a, out, n=name: outs.__setitem__(n, out)))
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            logits = model(**batch).logits
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            grads = torch.autograd.grad(loss, list(outs.values()))
        for h in hooks:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        keep = batch["attention_mask"].reshape(-1) != 0
        for name, g in zip(outs, grads):
            rows = g.reshape(-1, g.shape[-1])[keep].double()
            sums[name] = sums.get(name, 0) + rows.pow(2).sum(0)
        tokens += int(keep.sum())
    return {n: s / tokens for n, s in sums.items()}


def test_output_fisher_equals_gradients_on_the_hf_model():
    cap = captured("llama")
    batches = _calib()
    outputs = {path: [s.node for s in find_sites(cap.graph, t)] for path, t in cap.graph.targets.items()
               if ".layers." in path and t.kind == "linear"}
    flags = [p.requires_grad for p in cap.graph.module.parameters()]
    got = output_fisher(cap.graph, outputs, batches)
    assert [p.requires_grad for p in cap.graph.module.parameters()] == flags  # left as it was
    want = _hf_fisher(cap.model, batches)
    assert set(got) == set(want) and len(got) == 2 * 7
    for path in want:
        torch.testing.assert_close(got[path], want[path], rtol=1e-4, atol=1e-12 + 1e-4 * float(want[path].max()))


def _one_token_batch():
    return {"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.ones(2, 1, dtype=torch.long)}


def test_a_batch_with_no_token_to_predict_is_passed_over():
    """A batch of one-token rows (short texts batched four at a time) refused `by fisher` for the
    whole model, "this model cannot give it": it has no gradient to give, the others do."""
    cap = captured("llama")
    outputs = {path: [s.node for s in find_sites(cap.graph, t)] for path, t in cap.graph.targets.items()
               if ".layers." in path and t.kind == "linear"}
    got = output_fisher(cap.graph, outputs, [_calib()[0], _one_token_batch(), _calib()[1]])
    want = _hf_fisher(cap.model, _calib())
    for path in want:
        torch.testing.assert_close(got[path], want[path], rtol=1e-4, atol=1e-12 + 1e-4 * float(want[path].max()))


def test_calibration_with_no_token_to_predict_at_all_says_so():
    lm = tiny("llama", layers=2)
    policy = "policy p {\nprecision blocks.*.** : Linear choose {int8, int4} budget avg_bits<=6 by fisher\n}"
    with pytest.raises(SpecError) as e:
        slimfx.compile(lm, policy, calib=[_one_token_batch()] * 2, backend="eager")
    assert e.value.kind == "unsupported" and e.value.line == 2, e.value.render()
    assert "none of the 2 calibration batches has a token to predict" in e.value.message
    assert "cannot give it" not in e.value.message and "two tokens or more" in e.value.hint


def test_weighted_error_is_the_expected_loss_weighted_output_error():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    d = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    f = torch.rand(4, generator=gen, dtype=torch.float64)
    direct = float(((X @ d.T).pow(2) * f).sum(1).mean())
    assert weighted_error(d, X.T @ X / 50, f) == pytest.approx(direct, rel=1e-10)


def test_budget_by_fisher_compiles_and_says_so():
    lm = tiny("llama", layers=2)
    policy = ("policy p {\nprecision blocks.*.** : Linear choose {int8, int4 group=16} budget avg_bits<=6 "
              "by fisher\n}")
    calib = _calib(pad=False)
    cm = slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, calib=calib, backend="eager")
    details = cm.report.rules[0].details
    assert details["metric"] == "fisher" and details["achieved_avg_bits"] <= 6
    assert len(set(details["choices"].values())) == 2
    # The score the solver minimised, written here: Σ over targets Σ_o F_o (ΔW H ΔWᵀ)_oo of the
    # chosen RTN encodings, with F and H taken with hooks on the Hugging Face model (a scorer
    # handing the solver √F, or H alone, chose and compiled as well: only the score showed it).
    H, fisher = linear_input_hessians(lm.model, calib), _hf_fisher(lm.model, calib)
    fmts = {"int8 per-channel": QuantFormat(8, None, True), "int4 group=16": QuantFormat(4, 16, True)}
    direct = 0.0
    for path, choice in details["choices"].items():
        w = lm.model.get_submodule(path).weight.detach().double()
        d = w - dequantize(quantize_rtn(w.float(), fmts[choice])).double()
        direct += float((((d @ H[path]) * d).sum(1) * fisher[path]).sum())
    assert details["sensitivity"] == pytest.approx(direct, rel=1e-3)


def test_by_fisher_is_refused_on_a_model_without_logits():
    lm = tiny("bert", layers=2)
    policy = ("policy p {\nprecision blocks.*.** : Linear choose {int8, int4 group=16} budget avg_bits<=6 "
              "by fisher\n}")
    calib = [{k: v for k, v in lm.example_inputs.items()}]
    with pytest.raises(SpecError) as e:
        slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, calib=calib, backend="eager")
    assert e.value.kind == "unsupported" and "by output_mse" in e.value.hint and e.value.line == 2
    assert "this one has none" in e.value.message and "distill" not in e.value.message  # train()'s advice
