"""`adapt … dtype=fp16|bf16` (passes/adapters/storage.py): A and B stored rounded, read through one
cast each. Against PEFT with its adapter weights rounded the same way; bit-equal to fp32 adapters
holding the rounded values; the default (fp32) graph unchanged; bytes exact; save/load
bit-identical; `init=error`, `merge=true`, a later `quantize`, PEFT export and training."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import slimfx
from output_compare import max_diff, outputs
from passes_tiny import Wide, captured, linear_input_hessians
from slimfx import SpecError
from slimfx.runtime.adapters import tag_of
from slimfx.runtime.compiled import CompiledModel
from slimfx.runtime.formats import QuantFormat, QuantizedWeight, dequantize
from slimfx.runtime.program_copy import copy_program
from slimfx.runtime.report import Report

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
QV = "blocks.*.attn.{q,v}"


@functools.lru_cache(maxsize=None)
def _base() -> CompiledModel:
    """The session's tiny Llama capture (passes_tiny), wrapped once: compile() copies it."""
    graph = captured("llama").graph
    return CompiledModel(copy_program(graph), report=Report(None, graph.model_class))


def _compile(*rules: str, **kwargs) -> CompiledModel:
    return slimfx.compile(_base(), "policy p {\n" + "\n".join(rules) + "\n}", **kwargs)


def _inputs() -> dict:
    return captured("llama").inputs


def _perturb(cm: CompiledModel, seed: int = 0) -> None:
    """Trained-looking adapters (a fresh B is zero and would hide the rank path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.copy_(p.float() + torch.randn(p.shape, generator=g) * 0.2)


def _casts(cm: CompiledModel) -> list:
    return [n for n in cm.program.graph.nodes if (t := tag_of(n)) is not None and t["part"] == "cast"]


# ---- what it computes ------------------------------------------------------------------------

def test_the_default_is_fp32_and_leaves_the_graph_as_before():
    torch.manual_seed(0)
    plain = _compile(f"adapt {QV} dora rank=4")
    torch.manual_seed(0)
    written = _compile(f"adapt {QV} dora rank=4 dtype=fp32")
    assert plain.program.code == written.program.code and not _casts(plain)
    assert {p.dtype for p in plain.adapter_parameters()} == {torch.float32}
    for cm in (plain, written):
        _perturb(cm)
    assert max_diff(outputs(plain, _inputs()), outputs(written, _inputs())) == 0
    assert "dtype" not in plain.report.rules[0].details


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_adapters_compute_as_fp32_ones_holding_the_rounded_values(method, dtype):
    half = _compile(f"adapt {QV} {method} rank=4 dtype={dtype}")
    assert max_diff(outputs(half, _inputs()), outputs(captured("llama").model, _inputs())) == 0  # fresh: B = 0
    _perturb(half)
    stored = {n: p.dtype for n, p in half.program.named_parameters() if "lora_" in n}
    assert {d for n, d in stored.items() if not n.endswith("lora_magnitude")} == {HALF[dtype]}
    assert {d for n, d in stored.items() if n.endswith("lora_magnitude")} <= {torch.float32}
    assert len(_casts(half)) == 2 * len(half.adapters)  # one per A and per B
    full = _compile(f"adapt {QV} {method} rank=4")
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    assert max_diff(outputs(half, _inputs()), outputs(full, _inputs())) == 0
    assert half.report.rules[0].details["dtype"] == dtype and f" {dtype} adapters" in half.report.rules[0].notes[0]


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    """method -> (directory of a trained-looking PEFT adapter on q/v, that PeftModel)."""
    made = {}

    def get(method: str):
        if method not in made:
            config = LoraConfig(r=4, lora_alpha=8, target_modules=["self_attn.q_proj", "self_attn.v_proj"],
                                use_dora=method == "dora")
            pm = get_peft_model(copy.deepcopy(captured("llama").model), config)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_" in name:
                        p.add_(torch.randn(p.shape, generator=g) * 0.2)
            directory = tmp_path_factory.mktemp(f"peft-{method}")
            pm.save_pretrained(directory)
            made[method] = directory, pm.eval()
        return made[method]

    return get


def _rounded_peft(pm: PeftModel, dtype: torch.dtype) -> PeftModel:
    """The outside reference: PEFT's own model with lora_A and lora_B cast to `dtype` and back."""
    rounded = copy.deepcopy(pm)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(p.to(dtype).float())
    return rounded


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_from_peft_in_half_gives_peft_s_outputs_with_rounded_weights(method, dtype, peft_dirs):
    directory, pm = peft_dirs(method)
    want = outputs(_rounded_peft(pm, HALF[dtype]), _inputs())
    assert max_diff(want, outputs(pm, _inputs())) > 1e-6  # the rounding shows in the outputs
    cm = _compile(f'adapt {QV} {method} from="{directory}" dtype={dtype}')
    assert max_diff(outputs(cm, _inputs()), want) < 1e-5
    assert {p.dtype for n, p in cm.program.named_parameters() if n.endswith(("lora_A", "lora_B"))} == {HALF[dtype]}
    merged = _compile(f'adapt {QV} {method} from="{directory}" dtype={dtype} merge=true')
    assert not merged.adapter_parameters() and max_diff(outputs(merged, _inputs()), want) < 1e-5
    assert {p.dtype for p in merged.program.parameters()} == {torch.float32}  # the base keeps its dtype


def test_peft_export_of_half_adapters_loads_in_peft(tmp_path):
    """save_adapters writes the stored values as float32 (exact): PEFT then computes as slimfx does."""
    cm = _compile(f"adapt {QV} lora rank=4 alpha=8 dtype=fp16")
    _perturb(cm)
    cm.save_adapters(tmp_path / "a")
    pm = PeftModel.from_pretrained(copy.deepcopy(captured("llama").model), tmp_path / "a").eval()
    assert max_diff(outputs(pm, _inputs()), outputs(cm, _inputs())) < 1e-5


# ---- bytes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype, size", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_bytes_are_the_stored_ones(method, dtype, size):
    r, fan_in, fan_out = 16, 256, 64
    model = Wide()
    cm = slimfx.compile(model, f"policy p {{\nadapt proj {method} rank={r} dtype={dtype}\n}}",
                        example_inputs={"x": torch.randn(2, fan_in)})
    magnitude = 4 * fan_out if method == "dora" else 0  # float32 whatever the dtype
    rule = cm.report.rules[0]
    assert rule.bytes_after - rule.bytes_before == r * (fan_in + fan_out) * size + magnitude
    original = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cm.weight_bytes() - original == r * (fan_in + fan_out) * size + magnitude
    assert rule.details["trainable_params"] == r * (fan_in + fan_out) + (fan_out if method == "dora" else 0)


# ---- artifacts, later rules, training --------------------------------------------------------

def test_save_load_is_bit_identical_and_keeps_the_dtype(tmp_path):
    cm = _compile("quantize blocks.*.mlp.* : Linear int4 group=16", f"adapt {QV} dora rank=4 dtype=bf16 dropout=0.1")
    _perturb(cm)
    cm.save(tmp_path / "a")
    back = slimfx.load(tmp_path / "a")
    assert max_diff(outputs(back, _inputs()), outputs(cm, _inputs())) == 0
    assert back.adapters == cm.adapters and len(_casts(back)) == len(_casts(cm))
    for a, b in zip(back.adapter_parameters(), cm.adapter_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b) and a.requires_grad
    assert back.weight_bytes() == cm.weight_bytes()
    back.train()
    back(**_inputs()).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in back.adapter_parameters())


def test_a_later_quantize_packs_the_base_and_leaves_the_adapter_as_stored():
    cm = _compile(f"adapt {QV} dora rank=4 dtype=fp16", f"quantize {QV} int4 group=16")
    assert {p.dtype for n, p in cm.program.named_parameters() if n.endswith("lora_A")} == {torch.float16}
    _perturb(cm)
    with torch.no_grad():
        assert torch.isfinite(cm(**_inputs()).logits).all()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_training_half_adapters_is_training_fp32_ones_rounded_once_at_the_end(dtype):
    """slimfx.train keeps float32 masters: AdamW directly on fp16 parameters NaNs at step 2, and
    on bf16 ones drops updates below half a ulp."""
    half = _compile(f"adapt {QV} lora rank=4 dtype={dtype}")
    _perturb(half)
    full = _compile(f"adapt {QV} lora rank=4")
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    runs = [slimfx.train(cm, [_inputs()], steps=3, lr=1e-3) for cm in (half, full)]
    assert runs[0].losses == runs[1].losses
    for h, f in zip(half.adapter_parameters(), full.adapter_parameters()):
        assert h.dtype == HALF[dtype] and h.grad is None and torch.equal(h, f.detach().to(HALF[dtype]))


# ---- init=error ------------------------------------------------------------------------------

def _calib():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (2, 16), generator=gen),
             "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(3)]


def test_init_error_in_fp16_still_removes_most_of_each_target_s_output_error():
    quant = "quantize blocks.*.** : Linear int2 group=16"
    calib = _calib()
    cm = _compile(quant, "adapt blocks.*.** : Linear lora rank=8 alpha=16 init=error dtype=fp16", calib=calib)
    full = _compile(quant, "adapt blocks.*.** : Linear lora rank=8 alpha=16 init=error", calib=calib)
    model = captured("llama").model
    H = linear_input_hessians(model, calib)
    weights = dict(model.named_modules())
    for path, h in H.items():
        mod, ref = cm.program.get_submodule(path), full.program.get_submodule(path)
        assert mod.lora_A.dtype == torch.float16
        if path.startswith("model.layers.0.self_attn.") and path[-6] in "qkv":
            # the first input's fits see no adapter: the fp32 fit, rounded once
            assert torch.equal(mod.lora_A, ref.lora_A.half()) and torch.equal(mod.lora_B, ref.lora_B.half())
        else:  # later fits see the earlier adapters as stored, rounded or not: close, not equal
            half, single = (m.lora_B.double() @ m.lora_A.double() for m in (mod, ref))
            torch.testing.assert_close(half, single, atol=0.02 * float(single.abs().max()), rtol=0)
        w = weights[path].weight.detach().double()
        w_hat = dequantize(QuantizedWeight(mod.qweight, mod.scales, getattr(mod, "zeros", None),
                                           QuantFormat(2, 16, True), tuple(w.shape))).double()
        corrected = w_hat + cm.adapters[path].scale * mod.lora_B.double() @ mod.lora_A.double()
        before = float((((w - w_hat) @ h) * (w - w_hat)).sum())
        after = float((((w - corrected) @ h) * (w - corrected)).sum())
        assert after < 0.8 * before, f"{path}: {after:.4g} vs {before:.4g}"
    left = cm.report.rules[1].details["output_error_left"]
    assert 0 < left < 0.8 and left == pytest.approx(full.report.rules[1].details["output_error_left"], rel=0.05)


def test_init_error_dora_in_fp16_starts_where_lora_does():
    """The magnitude is taken from the rounded A and B, so k = 1 at the start as in fp32."""
    quant, calib = "quantize blocks.*.** : Linear int2 group=16", _calib()
    lora = _compile(quant, "adapt blocks.*.** : Linear lora rank=8 init=error dtype=fp16", calib=calib)
    dora = _compile(quant, "adapt blocks.*.** : Linear dora rank=8 init=error dtype=fp16", calib=calib)
    assert max_diff(outputs(dora, _inputs()), outputs(lora, _inputs())) < 1e-4


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, kind, words", [
    ("int8", "out-of-range", "one of fp32, fp16, bf16"), ("fp8", "out-of-range", "one of fp32, fp16, bf16"),
    ("fp61", "unknown-keyword", "did you mean `fp16`?"), ("4", "wrong-type", "`dtype=fp32`")])
def test_other_dtypes_are_refused_by_the_schema(value, kind, words):
    with pytest.raises(SpecError) as e:
        slimfx.parse(f"policy p {{\n    adapt blocks lora dtype={value}\n}}")
    assert (e.value.kind, e.value.line, e.value.column) == (kind, 2, 23)
    assert words in e.value.message + (e.value.hint or "")
