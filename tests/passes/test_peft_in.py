"""`adapt … from="dir"` (passes/adapters/peft_in.py) against the real peft package: an adapter
PEFT trained and saved gives the PeftModel's outputs, as adapters or merged, on Llama, GPT-2
(Conv1D), BERT and ViT, LoRA and DoRA; every bad directory or rule is a SpecError that says what
is wrong."""
from __future__ import annotations

import copy
import functools
import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import slimfx
from output_compare import max_diff, outputs
from passes_tiny import captured
from slimfx.dsl.errors import SpecError
from slimfx.runtime.compiled import CompiledModel
from slimfx.runtime.program_copy import copy_program
from slimfx.runtime.report import Report

# PEFT's notes on fan_in_fan_out; tiny models on one thread (tests/conftest.py)
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

SELECTORS = {"llama": "blocks.*.attn.{q,v}", "gpt2": "blocks.*.attn.**", "bert": "blocks.*.attn.{q,v}",
             "vit": "blocks.*.attn.{q,v}"}


@functools.lru_cache(maxsize=None)
def _base(arch: str) -> CompiledModel:
    """A CompiledModel over a copy of the session's capture (passes_tiny): compile() copies it
    again, so no test exports the model a second time or touches the shared graph."""
    graph = captured(arch).graph
    return CompiledModel(copy_program(graph), report=Report(None, graph.model_class))


@functools.lru_cache(maxsize=None)
def _selected(arch: str) -> tuple[str, ...]:
    plan = slimfx.plan(_base(arch), _policy(f"adapt {SELECTORS[arch]} lora"))
    return tuple(t.path for t in plan.rules[0].targets)


def _policy(rule: str) -> str:
    return "policy p {\n " + rule + "\n}"


def _trained_peft(arch: str, dora: bool, patterns: bool, seed: int = 0):
    """A PeftModel over the selected modules (named as users do, by their last two components),
    its adapters moved off their initial values as training would."""
    names = sorted({".".join(p.split(".")[-2:]) for p in _selected(arch)})
    extra = dict(rank_pattern={names[0]: 2}, alpha_pattern={names[0]: 3}) if patterns else {}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=names, use_dora=dora, fan_in_fan_out=arch == "gpt2",
                        **extra)
    pm = get_peft_model(copy.deepcopy(captured(arch).model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return pm.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(arch, dora, patterns) -> (directory of the saved PeftModel, its outputs)."""
    made = {}

    def get(arch: str, dora: bool = False, patterns: bool = False):
        key = (arch, dora, patterns)
        if key not in made:
            pm = _trained_peft(arch, dora, patterns)
            directory = tmp_path_factory.mktemp(f"peft-{arch}-{'dora' if dora else 'lora'}")
            pm.save_pretrained(directory)
            assert {k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
                    for k in load_file(directory / "adapter_model.safetensors")} == set(_selected(arch))
            made[key] = directory, outputs(pm, captured(arch).inputs)
        return made[key]

    return get


# ---- PEFT's adapters give PEFT's outputs -------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("arch", list(SELECTORS))
def test_adapter_from_peft_gives_itsoutputs(arch, method, saved):
    directory, want = saved(arch, method == "dora", patterns=True)
    inputs = captured(arch).inputs
    assert max_diff(want, outputs(captured(arch).model, inputs)) > 1e-3  # the adapters do something
    cm = slimfx.compile(_base(arch), _policy(f'adapt {SELECTORS[arch]} {method} from="{directory}"'))
    assert max_diff(outputs(cm, inputs), want) < 1e-5
    assert {a.rank for a in cm.adapters.values()} == {2, 4}  # rank_pattern
    assert {a.alpha for a in cm.adapters.values()} == {3.0, 8.0}  # alpha_pattern
    assert len(cm.adapter_parameters()) == len(_selected(arch)) * (3 if method == "dora" else 2)
    merged = slimfx.compile(_base(arch), _policy(f'adapt {SELECTORS[arch]} {method} from="{directory}" merge=true'))
    assert max_diff(outputs(merged, inputs), want) < 1e-5
    assert not merged.adapters and not merged.adapter_parameters()


def test_a_relative_path_is_taken_from_the_current_directory(saved, monkeypatch):
    directory, want = saved("llama")
    monkeypatch.chdir(directory.parent)
    cm = slimfx.compile(_base("llama"), _policy(f'adapt blocks.*.attn.{{q,v}} lora from="{directory.name}" '
                                                "rank=4 alpha=8"))  # written and equal: fine
    assert max_diff(outputs(cm, captured("llama").inputs), want) < 1e-5


# ---- what is refused ---------------------------------------------------------------------------------

@pytest.fixture
def damaged(saved, tmp_path):
    """A private copy of a saved Llama LoRA adapter (r=4, alpha=8 everywhere), free to damage."""
    return shutil.copytree(saved("llama")[0], tmp_path / "adapter")


def _refused(source, kind: str, *words: str, rule: str = "adapt blocks.*.attn.{q,v} lora") -> SpecError:
    with pytest.raises(SpecError) as info:
        slimfx.compile(_base("llama"), _policy(f'{rule} from="{source}"'))
    e = info.value
    assert (e.kind, e.line) == (kind, 2), e.render()
    # under `from="…"`, not the rule's first column
    assert e.source_line[e.column - 1:].startswith(f'from="{source}"') and e.first.width == len(f'from="{source}"'), e.render()
    for word in words:
        assert word in e.message + (e.hint or ""), e.render()
    return e


def _edit_config(directory, **changes) -> None:
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_a_missing_directory_names_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused("nowhere/adapter", "no-file", str(tmp_path / "nowhere" / "adapter"), "current directory")


def test_a_directory_without_a_config_is_not_an_adapter(damaged):
    (damaged / "adapter_config.json").unlink()
    _refused(damaged, "no-file", "not a PEFT adapter", "adapter_config.json")


def test_another_peft_type_is_refused(damaged):
    _edit_config(damaged, peft_type="IA3")
    _refused(damaged, "unsupported", "IA3", "LoRA and DoRA")


def test_a_pickled_adapter_is_never_unpickled(damaged):
    (damaged / "adapter_model.safetensors").rename(damaged / "adapter_model.bin")
    _refused(damaged, "unsupported", "adapter_model.bin", "pickle", "safetensors")


@pytest.mark.parametrize("changes, words", [
    ({"use_rslora": True}, ("use_rslora", "alpha/r", "lora_alpha = 8·√4 = 16")),
    ({"bias": "all"}, ('bias="all"',)),
    ({"lora_bias": True}, ("lora_bias=true",)),
    ({"modules_to_save": ["lm_head"]}, ('modules_to_save=["lm_head"]', "merge_and_unload")),
    ({"init_lora_weights": "pissa"}, ("'pissa'", "base weights", "path_initial_model_for_weight_conversion")),
])
def test_features_the_formulas_do_not_cover_are_refused(damaged, changes, words):
    _edit_config(damaged, **changes)
    _refused(damaged, "unsupported", *words)


def test_the_method_must_match(saved, damaged):
    _refused(damaged, "invalid-combination", "says `dora`", "LoRA adapter", "adapt … lora from=",
             rule="adapt blocks.*.attn.{q,v} dora")
    _refused(saved("llama", dora=True)[0], "invalid-combination", "says `lora`", "DoRA adapter")


@pytest.mark.parametrize("written, words", [
    ("rank=8", ("rank=8 is written", "rank 4", "drop rank=")),
    ("alpha=16", ("alpha=16 is written", "alpha 8", "drop alpha=")),
])
def test_written_rank_or_alpha_must_agree(damaged, written, words):
    _refused(damaged, "invalid-combination", *words, rule=f"adapt blocks.*.attn.{{q,v}} lora {written}")


def test_the_selection_must_be_the_adapters_modules(damaged):
    _refused(damaged, "invalid-combination", "selected by the rule but not in the adapter",
             "model.layers.0.self_attn.k_proj", rule="adapt blocks.*.attn.{q,k,v} lora")
    _refused(damaged, "invalid-combination", "in the adapter but not selected", "model.layers.1.self_attn.q_proj",
             rule="adapt blocks[0].attn.{q,v} lora")


@pytest.mark.parametrize("rule", ["adapt blocks.*.attn.{q,k} lora", "adapt blocks.*.attn.{q,v} dora",
                                  "adapt blocks.*.attn.{q,v} lora rank=8"])
def test_plan_refuses_what_compile_would(damaged, rule):
    """plan checked only that the directory was there, and said "ready" (the CLI exited 0) for an
    adapter of other modules, of the other method, or of another rank than written."""
    with pytest.raises(SpecError) as compiled:
        slimfx.compile(_base("llama"), _policy(f'{rule} from="{damaged}"'))
    with pytest.raises(SpecError) as planned:
        slimfx.plan(_base("llama"), _policy(f'{rule} from="{damaged}"'))
    assert planned.value.render() == compiled.value.render()


@pytest.mark.parametrize("where", ["before", "after"])
def test_modules_keep_takes_from_the_rule_are_named_as_keeps(damaged, where):
    """The adapter covers both blocks and `keep blocks[0]` takes block 0's from the rule: the error
    said "in the adapter but not selected" and asked for another selector, which was right."""
    rules = ["keep blocks[0]", f'adapt blocks.*.attn.{{q,v}} lora from="{damaged}"']
    with pytest.raises(SpecError) as info:
        slimfx.compile(_base("llama"), "policy p {\n" + "\n".join(rules if where == "before" else rules[::-1]) + "\n}")
    e = info.value
    assert e.kind == "invalid-combination" and "but `keep` protects" in e.message, e.render()
    assert "model.layers.0.self_attn.q_proj" in e.message and "out of the `keep` rule" in e.hint


def test_shapes_must_fit_the_linears(damaged):
    file = damaged / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 5)
    save_file(tensors, file)
    _refused(damaged, "unsupported", "model.layers.1.self_attn.v_proj", "lora_A [4, 5]", "other sizes")


def test_tensors_of_other_kinds_are_refused(damaged):
    file = damaged / "adapter_model.safetensors"
    save_file({**load_file(file), "base_model.model.lm_head.weight": torch.zeros(3, 3)}, file)
    e = _refused(damaged, "unsupported", "base_model.model.lm_head.weight", "not LoRA/DoRA weights")
    assert "save_embedding_layers" not in e.hint


def test_a_base_weight_peft_saved_beside_the_adapter_says_how_to_save_without_it(damaged):
    """PEFT's save_embedding_layers="auto" saves an adapted tied head's base weight: the hint said
    "slimfx loads adapters of linear layers only", which the adapter is."""
    file = damaged / "adapter_model.safetensors"
    save_file({**load_file(file), "base_model.model.lm_head.base_layer.weight": torch.zeros(3, 3)}, file)
    e = _refused(damaged, "unsupported", "base_model.model.lm_head.base_layer.weight", "a base weight PEFT saved")
    assert "save_pretrained(dir, save_embedding_layers=False)" in e.hint


def test_a_wrapper_prefix_on_one_side_is_named(damaged):
    file = damaged / "adapter_model.safetensors"
    prefix = "base_model.model."
    save_file({k.replace(prefix, prefix + "outer.", 1): v for k, v in load_file(file).items()}, file)
    _refused(damaged, "invalid-combination", "extra `outer.`", "another class of this model")


@pytest.mark.parametrize("dropout", [5, -0.5, 1.0, "0.1", True])
def test_a_dropout_that_is_no_probability_is_refused(damaged, dropout):
    """Unchecked, lora_dropout=5 compiled and every call died in aten.dropout, even in eval mode."""
    _edit_config(damaged, lora_dropout=dropout)
    _refused(damaged, "out-of-range", "lora_dropout", "[0, 1)", "dropout=P")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0, -8, True, 1e39])
def test_a_lora_alpha_the_policy_would_refuse_is_refused(damaged, alpha):
    """Unchecked, lora_alpha NaN compiled and every output of the model was NaN; so did 1e39, whose
    alpha/r has no float32 value."""
    _edit_config(damaged, lora_alpha=alpha)
    _refused(damaged, "out-of-range", "lora_alpha=", "not a number > 0 and at most 3.4e38", "mend lora_alpha")


@pytest.mark.parametrize("changes", [{"r": 4.5}, {"rank_pattern": {"v_proj": 0}}])
def test_a_rank_that_is_no_whole_number_is_refused(damaged, changes):
    """int() cut "r": 4.5 to 4, silently."""
    _edit_config(damaged, **changes)
    _refused(damaged, "out-of-range", "is not an integer ≥ 1", "mend r / rank_pattern")


def test_a_config_nested_too_deeply_is_refused(damaged):
    (damaged / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(damaged, "no-file", "nested too deeply")


def test_an_adapter_saved_after_an_auto_collapse_is_brought_in_after_the_same_search(tmp_path):
    """Bound first on the whole model (the search decides the blocks at compile), the rule after
    an auto collapse was checked against 4 blocks' linears, and the adapter saved from the
    collapsed model (3 blocks) refused by plan and compile alike."""
    from slimfx.models import tiny

    lm = tiny("llama", layers=4)
    search = "collapse blocks auto(count=1, threshold=0.01, span=2)"
    calib = [lm.example_inputs]
    slimfx.compile(lm, f"{search}\nadapt blocks.*.attn.q lora rank=4", calib=calib).save_adapters(tmp_path / "a")
    policy = f'{search}\nadapt blocks.*.attn.q lora from="{tmp_path / "a"}"'
    slimfx.plan(lm, policy)
    assert len(slimfx.compile(lm, policy, calib=calib).adapters) == 3
