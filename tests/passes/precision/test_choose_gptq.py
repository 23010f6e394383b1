"""`precision … method=gptq`: candidates scored with GPTQ (not RTN), block by block in bounded memory
by default. Checked against Hessians taken here with hooks on the Hugging Face model, against
`quantize` for a single candidate, and against `sequential=false`."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.models import tiny
from slimfx.passes.precision.gptq import gptq, output_error
from slimfx.runtime.formats import QuantFormat, dequantize

from passes_tiny import linear_input_hessians, token_batches

CHOICES = "{int8, int4 group=16}"


def _calib(n=3, rows=2, length=12, seed=0):
    return token_batches(n, rows, length, seed)


def _policy(rule: str) -> str:
    return "policy p {\n" + rule + "\n}"


def _precision(extra: str = "", choices: str = CHOICES, bits: float = 6.0) -> str:
    return _policy(f"precision blocks.*.** : Linear choose {choices} budget avg_bits<={bits} by output_mse "
                   f"method=gptq {extra}")


@pytest.fixture(scope="module")
def setup():
    lm = tiny("llama", layers=3)
    return lm, _calib()


def _compile(lm, calib, policy):
    return slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, calib=calib, backend="eager")


def test_the_solver_sees_gptq_errors(setup):
    """With one-run Hessians the reported sensitivity is Σ tr(ΔW H ΔWᵀ) of the GPTQ encodings of
    the chosen formats, H taken here with hooks on the original model; RTN scores are larger."""
    lm, calib = setup
    cm = _compile(lm, calib, _precision("sequential=false"))
    details = cm.report.rules[0].details
    assert details["scored_with"] == "gptq"
    H = linear_input_hessians(lm.model, calib)
    modules = dict(lm.model.named_modules())
    fmts = {"int8 per-channel": QuantFormat(8, None, True), "int4 group=16": QuantFormat(4, 16, True)}
    direct = 0.0
    for path, choice in details["choices"].items():
        w = modules[path].weight.detach()
        direct += output_error(w, dequantize(gptq(w, H[path], fmts[choice])), H[path])
    assert details["sensitivity"] == pytest.approx(direct, rel=1e-3)
    rtn = _compile(lm, calib, _precision().replace("method=gptq", "method=rtn"))
    assert rtn.report.rules[0].details["scored_with"] == "rtn"
    assert rtn.report.rules[0].details["sensitivity"] > details["sensitivity"]


def test_one_candidate_encodes_as_quantize_does(setup):
    """Block by block, a single candidate gives the codes sequential `quantize` gives."""
    lm, calib = setup
    cm = _compile(lm, calib, _precision(choices="{int4 group=16}"))
    q = _compile(lm, calib, _policy("quantize blocks.*.** : Linear int4 group=16 method=gptq"))
    a, b = cm.state_dict(), q.state_dict()
    packed = [k for k in b if k.endswith(".qweight")]
    assert len(packed) == 3 * 7
    for k in packed:
        assert torch.equal(a[k], b[k]), k
    details = cm.report.rules[0].details
    assert details["sequential"] is True and details["calib_tokens"] == 3 * 2 * 12


def test_sequential_scores_on_the_uncompressed_stream(setup):
    """The scoring sweep runs on the float model's activations, so it chooses as sequential=false
    does; the chosen formats are then encoded on the compressed stream, which changes codes."""
    lm, calib = setup
    seq = _compile(lm, calib, _precision(bits=6.0))
    flat = _compile(lm, calib, _precision("sequential=false", bits=6.0))
    s, f = seq.report.rules[0].details, flat.report.rules[0].details
    assert s["choices"] == f["choices"] and len(set(s["choices"].values())) == 2  # a real mix
    assert s["sensitivity"] == pytest.approx(f["sensitivity"], rel=1e-6)
    later = "program.model.layers.2.mlp.down_proj.qweight"
    assert not torch.equal(seq.state_dict()[later], flat.state_dict()[later])


def test_peak_memory_is_one_block_not_the_model(setup):
    """What the block-by-block sweep holds (Hessians of one block and the values at one block
    boundary) is reported, and is less than the Hessians of every block at once."""
    lm, calib = setup
    cm = _compile(lm, calib, _policy("quantize blocks.*.** : Linear int4 group=16 method=gptq"))
    peak = cm.report.rules[0].details["peak_calib_bytes"]
    cfg = lm.model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_block = 8 * (3 * h * h + i * i)  # float64; q/k/v share one, o one, gate/up share one, down one
    assert per_block <= peak < 3 * per_block
