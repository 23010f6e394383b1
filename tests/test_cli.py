"""The `slimfx` command: check, exit codes, caret errors on stderr, no torch import; plan, compile and
eval (fmt: test_cli_fmt.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

from slimfx.cli import main

SPECS = sorted((Path(__file__).parents[1] / "specs").glob("*.slim"))
TYPO = "policy p {\n    quantise head int8\n}\n"


def write(tmp_path, text, name="p.slim"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_check_accepts_every_shipped_spec(capsys):
    assert main(["check", *map(str, SPECS)]) == 0
    err = capsys.readouterr().err
    assert all(f"{p}: ok" in err for p in SPECS)


def test_check_a_typo_prints_line_column_caret_and_did_you_mean(tmp_path, capsys):
    f = write(tmp_path, TYPO)
    assert main(["check", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:2:5: error[unknown-keyword]" in err
    assert "        quantise head int8\n        ^^^^^^^^\n" in err
    assert "did you mean `quantize`?" in err


def test_check_reports_every_file_and_missing_ones(tmp_path, capsys):
    good, bad = write(tmp_path, "policy p {\n}\n", "good.slim"), write(tmp_path, TYPO, "bad.slim")
    assert main(["check", str(good), str(bad), str(tmp_path / "gone.slim")]) == 1
    err = capsys.readouterr().err
    assert "good.slim: ok" in err and "bad.slim:2:5" in err
    # as plan and compile say it: with its kind and what to do (it had neither)
    assert f"gone.slim: error[no-file]: cannot read {tmp_path / 'gone.slim'}: No such file" in err
    assert "= pass the path of an existing .slim file" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv", [["check", "x.slim", "--bogus"], ["check", "--bogus", "x.slim"],
                                  ["compile", "--model", "tiny:llama", "--out", "o", "--bogus", "keep head"]])
def test_an_unknown_option_is_named_under_its_commands_own_usage(argv, capsys):
    """It was reported under the top level's `usage: slimfx [-h] COMMAND ...`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: slimfx {argv[0]}" in err
    assert f"slimfx {argv[0]}: error: unrecognized arguments: --bogus" in err


def test_no_command_lists_the_commands_and_an_option_first_says_the_command_comes_first(capsys):
    """Both said only "the following arguments are required: COMMAND"."""
    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("check", "fmt", "plan", "compile", "train", "eval"))
    with pytest.raises(SystemExit) as e:
        main(["--bogus", "check", "x.slim"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized option --bogus: the command comes first" in err


def test_the_installed_command_reads_stdin_and_never_imports_torch():
    code = ("import sys; from slimfx.cli import main; rc = main(['check', '-']); "
            "assert 'torch' not in sys.modules, 'check imported torch'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], input=TYPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "<stdin>:2:5" in run.stderr
    run = subprocess.run([sys.executable, "-m", "slimfx", "fmt", "-"], input="policy p {\n keep head\n}",
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "policy p {\n    keep head\n}\n"


def test_plan_prints_the_table_for_a_model(tmp_path, capsys, monkeypatch):
    # tiny:llama has 2 blocks: a token rule after the last one would be an error, not a plan.
    f = write(tmp_path, "policy p {\n    quantize blocks.*.** : Linear int8\n    tokens after blocks[0] prune keep=0.5\n}\n")
    assert main(["plan", str(f), "--model", "tiny:llama"]) == 0
    out = capsys.readouterr().out
    assert "slimfx plan: policy p" in out and "ready" in out and "not implemented" not in out
    # off a terminal the table is 200 columns wide, and no line runs on in rich's padding to it
    assert out.endswith("\n") and not any(line.endswith(" ") for line in out.splitlines()), out
    # A rule without a pass (none in this version) is marked, not hidden.
    from slimfx.dsl import ast as A
    from slimfx.passes.pipeline import PASSES

    monkeypatch.delitem(PASSES, A.Tokens)
    assert main(["plan", str(f), "--model", "tiny:llama"]) == 0
    assert "not implemented yet" in capsys.readouterr().out


def test_plan_errors_are_messages_not_tracebacks(tmp_path, capsys):
    f = write(tmp_path, "policy p {\n    quantize blocks.*.atn.q int8\n}\n")
    assert main(["plan", str(f), "--model", "tiny:llama"]) == 1
    err = capsys.readouterr().err
    assert f"{f}:2:14: error[selector]" in err and "did you mean `attn`?" in err
    assert main(["plan", str(f), "--model", "tiny:lama"]) == 1
    err = capsys.readouterr().err
    assert "tiny:llama" in err and "loading" not in err  # "loading tiny:lama …" came before the refusal


def test_plan_from_standard_input_is_titled_as_its_errors_name_it(tmp_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"policy p {\n    keep head\n}\n")))
    assert main(["plan", "-", "--model", "tiny:llama"]) == 0
    out = capsys.readouterr().out
    assert "(<stdin>)" in out and "(-)" not in out


def test_policy_problems_are_found_before_the_model_loads(tmp_path, capsys):
    """A typo, a missing file or an unknown --policy cost loading the model first (SmolLM2: seconds)."""
    typo = write(tmp_path, TYPO)
    two = write(tmp_path, "policy a {\n    keep head\n}\npolicy b {\n    keep head\n}\n", "two.slim")
    for command in (["plan"], ["compile", "--out", str(tmp_path / "o")]):
        for spec, extra, says in ((typo, [], "error[unknown-keyword]"), (tmp_path / "gone.slim", [], "error[no-file]"),
                                  (two, ["--policy", "c"], "error[unknown-policy]")):
            assert main([command[0], str(spec), "--model", "tiny:llama", *command[1:], *extra]) == 1
            err = capsys.readouterr().err
            assert says in err and "loading" not in err, (command, err)
    assert main(["plan", str(two), "--model", "tiny:llama", "--policy", "b"]) == 0


def test_eval_of_a_tiny_model_prints_perplexity(capsys):
    assert main(["eval", "--model", "tiny:llama", "--max-tokens", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_compile_saves_an_artifact_that_eval_compares_side_by_side(tmp_path, capsys):
    spec = write(tmp_path, "policy p {\n    keep head\n}\n")
    out = tmp_path / "artifact"
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", str(out)]) == 0
    assert "slimfx compile: policy p" in capsys.readouterr().out
    assert (out / "meta.json").exists()
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(out), "--max-tokens", "64"]) == 0
    text = capsys.readouterr().out
    assert "compiled / original" in text and "×1.000" in text  # keep-only: same perplexity


def test_compile_stats_prints_the_fusion_groups_of_the_int4_graph(tmp_path, capsys):
    spec = write(tmp_path, "policy p {\n    quantize blocks.*.** : Linear int4 group=32\n}\n")
    out = tmp_path / "artifact"
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", str(out), "--stats"]) == 0
    text = capsys.readouterr().out
    assert "fusion groups" in text and "unfused:" in text and "fused:" in text
    # The groups read the reference graph (the CPU lowering is put aside for the table).
    assert "slimfx.quant_linear → silu → slimfx.quant_linear → mul.Tensor" in text
    assert (out / "meta.json").exists()


def test_compile_emit_kernels_writes_every_generated_source_with_its_nodes(tmp_path, capsys):
    spec = write(tmp_path, "policy p {\n    quantize blocks.*.** : Linear int4 group=32\n}\n")
    kernels = tmp_path / "kernels"
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", str(tmp_path / "a"),
                 "--emit-kernels", str(kernels)]) == 0
    assert f"kernels written to {kernels}" in capsys.readouterr().err
    files = sorted(kernels.glob("gemm_*.py")) + sorted(kernels.glob("rows_*.py"))
    index = (kernels / "index.txt").read_text()
    assert files and all(f"  {f.name}" in index for f in files)
    assert "groups left to eager ops:" in index
    texts = [f.read_text() for f in files]
    # A header names the graph nodes each source replaces; an int4 source dequantizes in the kernel.
    assert all(t.startswith("# slimfx generated kernel ") and "# group 1: " in t for t in texts)
    assert any("slimfx.quant_linear" in t and "int4 weight, groups of 32" in t for t in texts)
    assert any("replacing 5 groups" in t for t in texts)  # RMSNorm: 2 blocks × 2 and the final norm


def test_compile_checks_out_before_compiling_and_reads_calib_files(tmp_path, capsys):
    spec = write(tmp_path, "policy p {\n    quantize blocks.*.** : Linear int4 method=gptq\n}\n")
    a_file = write(tmp_path, "x", name="not-a-dir")
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", str(a_file)]) == 1
    err = capsys.readouterr().err
    assert "it is a file" in err and "loading" not in err  # refused before the model was loaded
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", str(tmp_path / "o"),
                 "--calib", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert "--calib: cannot read calibration text" in err and "list of strings" not in err  # Python's advice
    calib = write(tmp_path, "\n\n".join(f"calibration paragraph {i} with a few words" for i in range(5)), "c.txt")
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", str(tmp_path / "o"),
                 "--calib", str(calib)]) == 0
    assert (tmp_path / "o" / "meta.json").exists()


def test_compile_refuses_out_and_emit_kernels_paths_under_a_file_before_loading(tmp_path, capsys):
    """mkdir fails under a file: found at save, the whole compile was lost to a FileExistsError."""
    spec = write(tmp_path, "policy p {\n    keep head\n}\n")
    a_file = write(tmp_path, "x", name="a-file")
    for extra in (["--out", str(a_file / "sub")], ["--out", str(tmp_path / "o"), "--emit-kernels", str(a_file)],
                  ["--out", str(tmp_path / "o"), "--emit-kernels", str(a_file / "k")]):
        assert main(["compile", str(spec), "--model", "tiny:llama", *extra]) == 1
        err = capsys.readouterr().err
        assert "a-file" in err and ("is a file" in err) and "loading" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("listing", ["o", "o/kernels", "."])
def test_compile_refuses_out_and_emit_kernels_that_overlap_before_loading(tmp_path, capsys, listing, monkeypatch):
    """--emit-kernels into the --out folder failed after the compile and save, as a slimfx bug."""
    monkeypatch.chdir(tmp_path)
    spec = write(tmp_path, "policy p {\n    keep head\n}\n")
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", "o", "--emit-kernels", listing]) == 1
    err = capsys.readouterr().err
    assert f"--out o and --emit-kernels {listing} overlap" in err and "loading" not in err, err
    assert not (tmp_path / "o").exists()
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", "sub/o", "--emit-kernels", "sub/o/k"]) == 1
    assert "e.g. --emit-kernels sub/o-kernels (beside --out)" in capsys.readouterr().err  # not ./o-kernels


def test_an_unforeseen_error_is_one_message_and_the_traceback_is_there_on_request(tmp_path, capsys, monkeypatch):
    from slimfx import commands

    def broken(args):
        raise RuntimeError("something no check foresaw")

    monkeypatch.setattr(commands, "_load_model", broken)
    argv = ["eval", "--model", "tiny:llama"]
    monkeypatch.delenv("SLIMFX_TRACEBACK", raising=False)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: something no check foresaw" in err and "SLIMFX_TRACEBACK=1" in err
    assert "Traceback" not in err
    monkeypatch.setenv("SLIMFX_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="no check foresaw"):
        main(argv)


def test_eval_refuses_too_few_tokens_and_another_model_than_the_compiled_one(tmp_path, capsys):
    for n in ("1", "-5"):  # -5 scored all but the last five tokens
        assert main(["eval", "--model", "tiny:llama", "--max-tokens", n]) == 1
        assert "--max-tokens must be at least 2" in capsys.readouterr().err
    out = tmp_path / "artifact"
    assert main(["compile", str(write(tmp_path, "policy p {\n    keep head\n}\n")), "--model", "tiny:llama",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", "tiny:qwen2", "--compiled", str(out), "--max-tokens", "64"]) == 1
    captured = capsys.readouterr()
    assert "was compiled from a LlamaForCausalLM, --model tiny:qwen2 is a Qwen2ForCausalLM" in captured.err
    assert "perplexity" not in captured.out


def test_eval_of_a_decoder_compiled_with_restore_false_is_a_refusal_not_a_bug(tmp_path, capsys):
    # It printed as "error: ValueError: …" with "that traceback is a slimfx bug to report".
    out = tmp_path / "artifact"
    policy = write(tmp_path, "policy p {\n    tokens after blocks[0] prune keep=0.5\n}\n")
    assert main(["compile", str(policy), "--model", "tiny:llama", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(out), "--max-tokens", "64"]) == 1
    err = capsys.readouterr().err
    assert "\nerror: the model returned logits for" in err and "compile the same policy with restore=true" in err
    assert "slimfx bug" not in err and "ValueError" not in err


def test_eval_refuses_a_model_of_the_same_class_with_other_shapes(tmp_path, capsys, monkeypatch):
    """Only the class was compared: a SmolLM2 artifact passed against tiny:llama."""
    from slimfx import models

    out = tmp_path / "artifact"
    policy = str(write(tmp_path, "policy p {\n    drop blocks[1]\n    quantize blocks.*.mlp.* : Linear int8\n}\n"))
    assert main(["compile", policy, "--model", "tiny:llama", "--out", str(out)]) == 0
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(out), "--max-tokens", "64"]) == 0  # the same
    capsys.readouterr()
    native = models._tiny_config_kwargs
    monkeypatch.setattr(models, "_tiny_config_kwargs", lambda arch, layers: {**native(arch, layers), "hidden_size": 32})
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(out), "--max-tokens", "64"]) == 1
    captured = capsys.readouterr()
    assert (f"{out} was compiled from another LlamaForCausalLM: its model.embed_tokens.weight is [256, 64], "
            "--model tiny:llama's is [256, 32]") in captured.err
    assert "perplexity" not in captured.out


def test_eval_refuses_a_model_of_another_depth(tmp_path, capsys, monkeypatch):
    """Tensors were compared by the names both had: a 3-block artifact passed against a 2-block
    model (and scored ×0.577 of its bytes), and the other way round."""
    from slimfx import models

    native = models._tiny_config_kwargs
    policy = str(write(tmp_path, "policy p {\n    quantize blocks.*.mlp.* : Linear int8\n}\n"))
    deep, shallow = tmp_path / "deep", tmp_path / "shallow"
    assert main(["compile", policy, "--model", "tiny:llama", "--out", str(shallow)]) == 0
    with monkeypatch.context() as m:
        m.setattr(models, "_tiny_config_kwargs", lambda arch, layers: {**native(arch, layers), "num_hidden_layers": 3})
        assert main(["compile", policy, "--model", "tiny:llama", "--out", str(deep)]) == 0
        capsys.readouterr()
        assert main(["eval", "--model", "tiny:llama", "--compiled", str(shallow), "--max-tokens", "64"]) == 1
        assert (f"{shallow} was compiled from another LlamaForCausalLM: --model tiny:llama has model.layers.2, "
                "which the artifact neither has nor removed") in capsys.readouterr().err
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(deep), "--max-tokens", "64"]) == 1
    assert (f"{deep} was compiled from another LlamaForCausalLM: it has model.layers.2 (LlamaDecoderLayer), "
            "--model tiny:llama lacks it") in capsys.readouterr().err


def test_eval_of_a_drop_refuses_a_model_without_the_removed_block_and_reads_earlier_compiles(tmp_path, capsys,
                                                                                             monkeypatch):
    """A 1-block model passed as the original of a 2-block model with block 1 dropped (×1.000
    bytes, against ×0.654 for the real one); and an artifact compiled twice, the first compile
    dropping a block, was refused against its real original ("has model.layers.1, which the
    artifact neither has nor removed": the earlier compile's drop was not read)."""
    import slimfx
    from slimfx import models

    native = models._tiny_config_kwargs
    dropped, twice = tmp_path / "dropped", tmp_path / "twice"
    assert main(["compile", str(write(tmp_path, "policy d {\n    drop blocks[1]\n}\n")), "--model", "tiny:llama",
                 "--out", str(dropped)]) == 0
    slimfx.compile(slimfx.load(dropped), "quantize blocks.*.mlp.* : Linear int8").save(twice)
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(models, "_tiny_config_kwargs", lambda arch, layers: {**native(arch, layers), "num_hidden_layers": 1})
        assert main(["eval", "--model", "tiny:llama", "--compiled", str(dropped), "--max-tokens", "64"]) == 1
        assert (f"{dropped} was compiled from another LlamaForCausalLM: it removed model.layers.1, which --model "
                "tiny:llama lacks") in capsys.readouterr().err
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(twice), "--max-tokens", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_compile_calibrates_on_a_number_of_built_in_tokens(tmp_path, capsys, monkeypatch):
    from slimfx import api
    from slimfx.calibration import calibration_batches
    from slimfx.models import tiny

    seen, real = [], api.compile
    monkeypatch.setattr(api, "compile", lambda *a, **k: seen.append(k["calib"]) or real(*a, **k))
    spec = write(tmp_path, "policy p {\n    quantize blocks.*.** : Linear int4 method=gptq\n}\n")
    out = ["compile", str(spec), "--model", "tiny:llama", "--out", str(tmp_path / "o")]
    from slimfx import commands

    loads, load = [], commands._load_model
    monkeypatch.setattr(commands, "_load_model", lambda name: loads.append(name) or load(name))
    assert main(out + ["--calib-tokens", "10"]) == 1  # refused before the model loads (it was after)
    err = capsys.readouterr().err
    assert "--calib-tokens 10: ask for at least 128 tokens (one calibration row)" in err and not loads
    assert main(out + ["--calib-tokens", "10" + "0" * 9]) == 1
    err = capsys.readouterr().err
    assert "the built-in text has" in err and "ask for 128 to" in err and "calib=" not in err and loads
    with pytest.raises(SystemExit):  # argparse: one source of calibration or the other
        main(out + ["--calib-tokens", "512", "--calib", str(spec)])
    assert "not allowed with" in capsys.readouterr().err
    assert main(out + ["--calib-tokens", "512"]) == 0 and len(seen) == 1
    expected = calibration_batches(tiny("llama"), 512)  # 4 rows of 128 byte tokens
    assert [b["input_ids"].tolist() for b in seen[0]] == [b["input_ids"].tolist() for b in expected]


def test_artifact_errors_are_messages_not_tracebacks(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(tmp_path / "junk")]) == 1
    err = capsys.readouterr().err
    # said before the model loads (it came after "loading …", seconds for SmolLM2)
    assert err.startswith("error: ") and "not a slimfx artifact" in err and "Traceback" not in err


def test_plan_and_compile_read_the_policy_from_standard_input(tmp_path, capsys, monkeypatch):
    import io

    def stdin(text):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))

    stdin("policy p {\n    keep head\n}\n")
    assert main(["plan", "-", "--model", "tiny:llama"]) == 0
    assert "keep head" in capsys.readouterr().out
    stdin("policy p {\n    quantise head int8\n}\n")
    assert main(["compile", "-", "--model", "tiny:llama", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "<stdin>:2:5: error[unknown-keyword]" in err and "loading" not in err  # before the model loads
    stdin("policy p {\n    keep head\n}\n")
    assert main(["compile", "-", "--model", "tiny:llama", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "meta.json").exists()


def test_compile_calib_text_for_a_model_without_a_tokenizer_is_refused(tmp_path, capsys):
    spec = write(tmp_path, "policy p {\n    keep head\n}\n")
    calib = write(tmp_path, "some text to calibrate on", "c.txt")
    for option in (["--calib", str(calib)], ["--calib-tokens", "256"]):
        assert main(["compile", str(spec), "--model", "tiny:vit", "--out", str(tmp_path / "o"), *option]) == 1
        assert f"{option[0]} calibrates on text, and tiny:vit has no tokenizer" in capsys.readouterr().err


def test_emit_kernels_again_into_its_folder_leaves_no_stale_listing_and_refuses_other_folders(tmp_path, capsys):
    kernels = tmp_path / "kernels"
    for rules, out in (("quantize blocks.*.** : Linear int4 group=32", "a"), ("keep head", "b")):
        spec = write(tmp_path, f"policy p {{\n    {rules}\n}}\n")
        assert main(["compile", str(spec), "--model", "tiny:llama", "--out", str(tmp_path / out),
                     "--emit-kernels", str(kernels)]) == 0
        listed = {line.strip() for line in (kernels / "index.txt").read_text().splitlines() if line.endswith(".py")}
        assert {f.name for f in kernels.glob("*.py")} == listed  # the int4 GEMMs' files went with their listing
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["compile", str(spec), "--model", "tiny:llama", "--out", str(tmp_path / "c"),
                 "--emit-kernels", str(other)]) == 1
    err = capsys.readouterr().err
    assert "non-empty folder that no kernel listing wrote" in err and "loading" not in err
    assert (other / "keep.txt").read_text() == "mine"


def test_eval_gives_a_compiled_model_only_the_inputs_its_graph_takes(tmp_path, capsys):
    """An artifact compiled from bare input_ids (a documented form) was called with a mask, and one
    compiled with `labels` was called without them: both a TypeError printed as a slimfx bug."""
    import slimfx
    from slimfx.models import tiny

    lm = tiny("llama")
    ids = lm.example_inputs["input_ids"]
    for name, example in (("bare", ids), ("labels", dict(lm.example_inputs, labels=ids))):
        slimfx.compile(lm.model, "quantize blocks.*.mlp.* : Linear int8", example_inputs=example).save(tmp_path / name)
    capsys.readouterr()
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(tmp_path / "bare"), "--max-tokens", "64"]) == 0
    assert "compiled / original" in capsys.readouterr().out
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(tmp_path / "labels"), "--max-tokens", "64"]) == 1
    assert (f"{tmp_path / 'labels'} was compiled with the inputs ['input_ids', 'attention_mask', 'labels']; slimfx "
            "eval gives token ids and a mask, nothing for ['labels']") in capsys.readouterr().err


@pytest.mark.parametrize("command", ["check", "fmt"])
def test_standard_input_given_twice_is_a_usage_error(command, capsys, monkeypatch):
    """`check - -` said the policy was ok, then that standard input "holds no policy"."""
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"policy p {\n    keep head\n}\n")))
    with pytest.raises(SystemExit) as e:
        main([command, "-", "-"])
    assert e.value.code == 2
    assert "`-` (standard input) is given more than once" in capsys.readouterr().err
