"""The `slimfx` commands and the files around them: the policy argument is a file, a policy file
with no policy is refused, --out places that cannot work are refused before loading, a closed pipe
or a full disk loses no work and is not called a slimfx bug, nor is a link loop; --version; eval
says what --max-tokens could not do; --model and --compiled swapped are named so."""
import errno
import os
import subprocess
import sys

import pytest

import slimfx
from slimfx.cli import main
from slimfx.models import tiny
from test_cli import write
from test_cli_train import QLORA

KEEP = "policy p {\n    keep head\n}\n"
INT8 = "policy p {\n    quantize blocks.*.mlp.* : Linear int8\n}\n"


@pytest.mark.parametrize("name", ["v{2}.slim", "my policy", "int8"])
def test_a_policy_argument_is_read_as_a_file_whatever_its_name(tmp_path, capsys, name):
    """`plan 'v{2}.slim'` and `plan 'my policy'` were parsed as policy text."""
    spec = write(tmp_path, INT8, name)
    assert main(["plan", str(spec), "--model", "tiny:llama"]) == 0, capsys.readouterr().err
    assert "quantize" in capsys.readouterr().out
    assert slimfx.plan(tiny("llama"), str(spec)).rules[0].text.startswith("quantize")


def test_a_missing_policy_file_with_a_space_is_named_as_missing(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "my polcy"), "--model", "tiny:llama"]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "my polcy" in err and "loading" not in err


def test_a_line_of_rules_longer_than_a_file_name_is_policy_text():
    """Path(text).exists() raised 'File name too long' for a one-line policy past 255 bytes."""
    rules = "quantize blocks.*.mlp.gate_proj int8  # " + "why this layer and not the others " * 10
    plan = slimfx.plan(tiny("llama"), rules)
    assert plan.rules[0].text.startswith("quantize") and len(plan.rules[0].targets) == 2


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_a_file_without_a_policy_is_refused_by_compile_plan_and_check(tmp_path, capsys, text):
    """It compiled the model unchanged with exit 0; `check` said `ok (0 policies)`."""
    spec = write(tmp_path, text)
    for argv in (["compile", str(spec), "--model", "tiny:llama", "--out", str(tmp_path / "o")],
                 ["plan", str(spec), "--model", "tiny:llama"], ["check", str(spec)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "holds no policy (it is empty or only comments)" in err and "loading" not in err, err
    assert not (tmp_path / "o").exists()


def test_out_as_the_current_directory_or_a_dangling_link_is_refused_before_loading(tmp_path, capsys,
                                                                                   monkeypatch):
    spec = write(tmp_path, KEEP)
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out, says in ((".", "it is the current directory"), (str(tmp_path / "gone"), "which does not exist")):
        assert main(["compile", str(spec), "--model", "tiny:llama", "--out", out]) == 1
        err = capsys.readouterr().err
        assert says in err and "loading" not in err, err
    assert list(work.iterdir()) == [] and not (tmp_path / "nowhere").exists()


def test_a_link_loop_on_the_way_to_out_or_the_listing_is_a_message(tmp_path, capsys):
    """pathlib's RuntimeError('Symlink loop …') was printed as a slimfx bug."""
    spec = write(tmp_path, KEEP)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    loop = str(tmp_path / "a" / "x")
    for extra in (["--out", loop], ["--out", str(tmp_path / "o"), "--emit-kernels", loop]):
        assert main(["compile", str(spec), "--model", "tiny:llama", *extra]) == 1
        err = capsys.readouterr().err
        assert "leads back to itself" in err and "slimfx bug" not in err and "loading" not in err, err


def test_train_of_the_root_directory_asks_for_out(capsys):
    """Its default --out (DIR-trained beside DIR) raised ValueError("'/' has an empty name")."""
    assert main(["train", "--model", "tiny:llama", "--compiled", "/", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "pass --out" in err and "slimfx bug" not in err, err


def _closed_pipe():
    """A stdout whose reader went away (`slimfx … | head -1` after the first line)."""
    read, write_end = os.pipe()
    os.close(read)
    return open(write_end, "w", buffering=1)


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # rich meets the closed pipe itself: stdout to /dev/null, exit 1
        return e.code


def test_a_closed_pipe_after_compile_keeps_the_artifact_and_says_nothing_of_a_bug(tmp_path, capsys, monkeypatch):
    """`compile --stats | head -1` lost the compile: the report was printed before saving."""
    spec, out = write(tmp_path, INT8), tmp_path / "o"
    monkeypatch.setattr(sys, "stdout", _closed_pipe())
    assert _exit_code(["compile", str(spec), "--model", "tiny:llama", "--out", str(out), "--stats"]) == 1
    monkeypatch.undo()
    assert "slimfx bug" not in capsys.readouterr().err
    slimfx.load(out)


def test_a_closed_pipe_after_train_keeps_the_trained_artifact(tmp_path, capsys, monkeypatch):
    art = tmp_path / "qlora"
    assert main(["compile", str(write(tmp_path, QLORA)), "--model", "tiny:llama", "--out", str(art)]) == 0
    monkeypatch.setattr(sys, "stdout", _closed_pipe())
    assert _exit_code(["train", "--model", "tiny:llama", "--compiled", str(art), "--steps", "2", "--batch", "1",
                       "--seq", "16"]) == 1
    monkeypatch.undo()
    assert "slimfx bug" not in capsys.readouterr().err
    slimfx.load(tmp_path / "qlora-trained")


def test_a_real_pipe_closed_early_ends_quietly(tmp_path):
    spec, out = write(tmp_path, INT8), tmp_path / "o"
    run = subprocess.run(f"{sys.executable} -m slimfx compile {spec} --model tiny:llama --out {out} --stats "
                         "| head -c 1", shell=True, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})  # buffered, as users run it
    assert "Traceback" not in run.stderr and "slimfx bug" not in run.stderr and "Exception ignored" not in run.stderr
    slimfx.load(out)


def test_train_of_the_current_directory_saves_beside_it(tmp_path, capsys, monkeypatch):
    """`train --compiled .` wrote `.-trained` inside the artifact it trained."""
    art = tmp_path / "qlora"
    assert main(["compile", str(write(tmp_path, QLORA)), "--model", "tiny:llama", "--out", str(art)]) == 0
    monkeypatch.chdir(art)
    assert main(["train", "--model", "tiny:llama", "--compiled", ".", "--steps", "1", "--batch", "1",
                 "--seq", "16"]) == 0
    assert f"saved to {tmp_path / 'qlora-trained'}" in capsys.readouterr().err
    assert not (art / ".-trained").exists()
    slimfx.load(tmp_path / "qlora-trained")


def test_a_full_disk_is_a_message_not_a_slimfx_bug(tmp_path, capsys, monkeypatch):
    import slimfx.runtime.artifact_files as files

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_bytes", full)
    monkeypatch.setattr("slimfx.runtime.artifact._write_bytes", full)
    _compile_on_a_full_disk(tmp_path, capsys)


def _compile_on_a_full_disk(tmp_path, capsys) -> None:
    """compile fails with the free-some-space advice, not as a slimfx bug, and leaves nothing."""
    out = tmp_path / "o"
    assert main(["compile", str(write(tmp_path, KEEP)), "--model", "tiny:llama", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space" in err and "slimfx bug" not in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["p.slim"]


def test_a_full_disk_under_the_weights_writer_gets_the_same_advice(tmp_path, capsys, monkeypatch):
    """The safetensors writer reports ENOSPC as text: it read 'cannot write weights.safetensors: …'
    without the advice, as an ArtifactError."""
    def full(tensors, path, metadata=None):
        raise Exception(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    _compile_on_a_full_disk(tmp_path, capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"slimfx {slimfx.__version__}\n"


def test_eval_says_when_max_tokens_is_more_than_the_text_or_unused(capsys):
    """--max-tokens was capped to the text's length, and ignored on encoders, without a word."""
    assert main(["eval", "--model", "tiny:llama", "--max-tokens", "10000000"]) == 0
    err = capsys.readouterr().err
    assert "note: the eval text is" in err and "the perplexity reads all of them (--max-tokens 10,000,000 asked" in err
    assert main(["eval", "--model", "tiny:llama", "--max-tokens", "64"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(["eval", "--model", "tiny:bert", "--max-tokens", "64"]) == 0
    assert "note: --max-tokens is not used: it counts the tokens a perplexity scores, and tiny:bert is an encoder" \
        in capsys.readouterr().err


def test_calibration_a_policy_never_uses_is_said(tmp_path, capsys):
    """--calib-tokens on a round-to-nearest policy was accepted and ignored without a word."""
    rtn, gptq = write(tmp_path, INT8, "rtn.slim"), write(tmp_path, INT8.replace("int8", "int4 method=gptq"), "g.slim")
    assert main(["compile", str(rtn), "--model", "tiny:llama", "--out", str(tmp_path / "a"),
                 "--calib-tokens", "256"]) == 0
    out, err = capsys.readouterr()
    assert "note: --calib-tokens was not used: no rule of this policy calibrates" in err and "calibrated on" not in out
    assert main(["compile", str(gptq), "--model", "tiny:llama", "--out", str(tmp_path / "b"),
                 "--calib-tokens", "256"]) == 0
    out, err = capsys.readouterr()
    assert "note:" not in err and "calibrated on 256 tokens in 2 rows" in out


def test_eval_and_train_say_when_model_and_compiled_look_swapped(tmp_path, capsys):
    """`--compiled <a Hugging Face folder>` said only "not a slimfx artifact", and `--model
    <artifact>` "exists but holds no config.json": neither said the two were swapped."""
    folder, art = tmp_path / "hf", tmp_path / "art"
    tiny("llama").model.save_pretrained(folder)
    assert main(["compile", str(write(tmp_path, KEEP)), "--model", str(folder), "--out", str(art)]) == 0
    capsys.readouterr()
    for command in (["eval"], ["train", "--steps", "1"]):
        assert main(command + ["--model", str(art), "--compiled", str(folder)]) == 1
        err = capsys.readouterr().err
        assert (f"--compiled {folder} holds a Hugging Face model (config.json), not a slimfx artifact and --model "
                f"{art} is one: swap the two") in err, err
        assert main(command + ["--model", "tiny:llama", "--compiled", str(folder)]) == 1
        assert "pass it as --model, and as --compiled the directory `slimfx compile --out` wrote" in \
            capsys.readouterr().err
    assert main(["plan", str(write(tmp_path, KEEP)), "--model", str(art)]) == 1
    assert (f"{str(art)!r} is a slimfx artifact (it holds meta.json), not a model: `slimfx eval` and `train` take it "
            "as --compiled" in capsys.readouterr().err)
