"""The `slimfx` command on arguments and streams a script or another machine gives it (CLI audit):
an empty path (an unset shell variable) is a usage error, not "not given"; a policy without rules
is refused by plan and compile as an empty file is; a stdout that cannot encode every character
(cp1252, Latin-1) gets `?` in tables, and `fmt` writes the policy itself in UTF-8."""
import io
import sys

import pytest

from slimfx.cli import main


def write(tmp_path, text, name="p.slim"):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return f


class Cp1252Stdout(io.TextIOWrapper):
    """stdout as Windows gives it when redirected to a file, or a shell under a Latin-1 locale."""

    def __init__(self):
        super().__init__(io.BytesIO(), encoding="cp1252")


@pytest.mark.parametrize("argv, option", [
    (["eval", "--model", "tiny:llama", "--compiled", ""], "--compiled"),
    (["train", "--model", "tiny:llama", "--compiled", "ART", "--steps", "1", "--out", ""], "--out"),
    (["compile", "P", "--model", "tiny:llama", "--out", ""], "--out"),
    (["compile", "P", "--model", "", "--out", "o"], "--model"),
    (["plan", "", "--model", "tiny:llama"], "spec"),
    (["check", ""], "FILE"),  # it said ": error[no-file]: cannot read : Is a directory", exit 1
    (["fmt", "P", ""], "FILE"),
    (["plan", "P", "--model", "tiny:llama", "--policy", ""], "--policy"),  # "no policy `` in P", exit 1
    (["compile", "P", "--model", "tiny:llama", "--out", "o", "--policy", ""], "--policy"),
])
def test_an_empty_path_or_name_is_a_usage_error_not_one_left_out(tmp_path, capsys, argv, option):
    """eval --compiled '' scored the original alone and exited 0; train --out '' wrote to the default."""
    argv = [str(tmp_path / "art") if a == "ART" else str(write(tmp_path, "keep head\n")) if a == "P" else a
            for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}: is empty" in err, err
    assert not list(tmp_path.glob("art*")) and not (tmp_path / "o").exists()


def test_a_policy_without_rules_is_refused_by_plan_and_compile_and_noted_by_check(tmp_path, capsys):
    spec = write(tmp_path, "policy p {\n}\n")
    for argv in (["plan", str(spec), "--model", "tiny:llama"],
                 ["compile", str(spec), "--model", "tiny:llama", "--out", str(tmp_path / "o")]):
        assert main(argv) == 1
        assert "policy `p` in" in (err := capsys.readouterr().err) and "has no rules" in err, err
    assert not (tmp_path / "o").exists()
    assert main(["check", str(spec)]) == 0
    assert "note: `p` has no rules; plan and compile refuse it" in capsys.readouterr().err


def test_fmt_to_a_cp1252_stdout_writes_the_policy_in_utf8(tmp_path, monkeypatch):
    """It raised a raw UnicodeEncodeError traceback on the comment's `→`."""
    spec = write(tmp_path, "policy p {\n    quantize head int8  # 4× smaller → faster\n}\n")
    out = Cp1252Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["fmt", str(spec)]) == 0
    out.flush()
    assert out.buffer.getvalue().decode("utf-8") == spec.read_text(encoding="utf-8")


def test_plan_to_a_cp1252_stdout_prints_its_table_with_what_it_cannot_encode_as_question_marks(
        tmp_path, monkeypatch, capsys):
    """It printed 'error: UnicodeEncodeError … slimfx bug' and exited 1 (the table's box lines)."""
    spec = write(tmp_path, "policy p {\n    quantize blocks.*.** : Linear int8\n}\n")
    out = Cp1252Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["plan", str(spec), "--model", "tiny:llama"]) == 0, capsys.readouterr().err
    out.flush()
    table = out.buffer.getvalue().decode("cp1252")
    assert "model.layers.0.mlp.up_proj" in table or "blocks" in table, table


def test_an_artifact_folder_given_for_the_policy_is_named_as_one(tmp_path, capsys):
    """It said only "cannot read art: Is a directory"."""
    art = tmp_path / "art"
    art.mkdir()
    (art / "meta.json").write_text("{}")
    for argv in (["check", str(art)], ["plan", str(art), "--model", "tiny:llama"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "cannot read" in err and "it is a saved compiled model (an artifact), not a policy file" in err, err
