"""runtime/artifact_files.py: the places a save cannot use are named before any work (a file in
the way, a link that loops), a full disk under the weights writer is the OSError the callers
explain (not an ArtifactError without advice), and the warning about an old artifact left behind
names the user's line."""
from __future__ import annotations

import errno
import os
import re
import socket
import warnings

import pytest
import torch

import slimfx
import slimfx.runtime.artifact_files as files
import slimfx.runtime.atomic_dir as atomic_dir
from runtime_tiny import compiled
from slimfx.models import tiny
from slimfx.runtime.artifact import ArtifactError
from slimfx.runtime.peft_format import PeftFormatError


def test_nearest_existing_is_the_directory_a_mkdir_starts_in_or_the_file_in_the_way(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("x")
    assert files.nearest_existing(tmp_path / "a" / "b" / "c") == tmp_path / "a"
    assert files.nearest_existing(tmp_path / "f" / "b") == tmp_path / "f"


def test_a_link_loop_above_the_target_is_refused_before_saving(tmp_path):
    """resolve() raised RuntimeError('Symlink loop …'), which the CLI printed as a slimfx bug."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    target = tmp_path / "a" / "x" / "out"
    assert files.resolved_or_none(target) is None
    assert "leads back to itself" in files.unplaceable(target)
    with pytest.raises(ArtifactError, match="leads back to itself"):
        compiled("llama").cm.save(target)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES])
def test_a_full_disk_under_the_weights_writer_is_an_os_error(tmp_path, monkeypatch, code):
    """The Rust writer reports the errno in its text; it became 'cannot write weights.safetensors'
    without the free-some-space advice the CLI gives for an OSError."""
    def full(tensors, path, metadata=None):
        raise Exception(f'Error while serializing: I/O error: {files.os.strerror(code)} (os error {code}) '
                        f'at path "{path}"')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError) as caught:
        files.write_weights(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    assert caught.value.errno == code and caught.value.filename == str(tmp_path / "w.safetensors")


def test_other_weight_writer_errors_stay_artifact_errors(tmp_path):
    """Not a directory (os error 20) is not the machine's state: it stays an ArtifactError."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="cannot write weights.safetensors: .*os error 20"):
        files.write_weights(tmp_path / "f" / "w.safetensors", {"a": torch.zeros(2)})


def test_the_old_artifact_warning_names_the_users_line(tmp_path, monkeypatch):
    """An old artifact that cannot be deleted is named; stacklevel=4 pointed the warning at
    runtime/compiled.py's cm.save wrapper, not the caller."""
    case = compiled("llama")
    adapted = slimfx.compile(case.loaded, "adapt blocks.*.attn.q lora rank=2")
    saves = [(case.cm.save, tmp_path / "llama"), (adapted.save_adapters, tmp_path / "adapters")]
    for save, target in saves:
        save(target)
    monkeypatch.setattr(atomic_dir.shutil, "rmtree", lambda *a, **k: None)
    for save, target in saves:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            save(target)
        left = [w for w in caught if re.search(rf"the previous {target.name} is left at .*/\.{target.name}\.old-.*"
                                               "delete it yourself", str(w.message))]
        assert left and left[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]


@pytest.mark.parametrize("save", ["artifact", "adapters"])
def test_a_pipe_or_device_is_refused_as_a_place_to_save(tmp_path, save):
    """`slimfx compile --out /dev/null` as root replaced the device with an artifact; a named pipe
    hung the save for ever (the old entry is opened to be deleted)."""
    cm = slimfx.compile(tiny("llama"), "adapt blocks.*.attn.q lora rank=2")
    with socket.socket(socket.AF_UNIX) as sock:  # a socket file: the old code replaced it, without hanging
        sock.bind(str(tmp_path / "sock"))
        with pytest.raises((ArtifactError, PeftFormatError), match="it is not a directory .a device, pipe or socket."):
            (cm.save if save == "artifact" else cm.save_adapters)(tmp_path / "sock")
    assert (tmp_path / "sock").is_socket()


def test_a_save_killed_outright_is_swept_by_the_next(tmp_path):
    """kill -9 mid-save left `.out.tmp-*` with a whole model's weights in it for ever. The next
    save to the same place deletes the ones whose process is gone, and only those."""
    import subprocess
    import sys

    target = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from pathlib import Path; import slimfx.runtime.atomic_dir as f\n"
        "f.write_atomic(Path(sys.argv[1]), lambda tmp: ((tmp / 'w').write_bytes(b'x' * 1000), os._exit(3)))"),
        str(target)], cwd=tmp_path)
    assert killed.returncode == 3
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1  # what the kill leaves
    running = tmp_path / f".out.tmp-{atomic_dir._HOST}-{os.getpid()}-abc"  # a save in progress
    elsewhere = tmp_path / ".out.tmp-otherhost-1-abc"  # another machine's, on a shared disk
    for d in (running, elsewhere):
        d.mkdir()
    atomic_dir.write_atomic(target, lambda tmp: (tmp / "w").write_bytes(b"y"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name, elsewhere.name])
    assert (target / "w").read_bytes() == b"y"


def test_the_weights_file_has_the_same_bytes_at_every_save(tmp_path):
    """Its header's metadata came out in a hash map's order, which changes from call to call: two
    saves of one model differed (content-addressed stores and caches saw a change)."""
    import hashlib

    tensors = {"a": torch.zeros(2), "b": torch.ones(3)}
    for i in range(12):
        files.write_weights(tmp_path / f"w{i}.safetensors", tensors)
    assert len({hashlib.sha256((tmp_path / f"w{i}.safetensors").read_bytes()).hexdigest() for i in range(12)}) == 1


def test_a_path_from_the_home_folder_is_expanded(tmp_path, monkeypatch):
    """cm.save("~/m") made a folder named `~` in the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    case = compiled("llama")
    case.cm.save("~/m")
    assert (tmp_path / "home" / "m" / "meta.json").is_file() and not (tmp_path / "~").exists()
    assert torch.equal(slimfx.load("~/m")(**case.loaded.example_inputs).logits,
                       case.cm(**case.loaded.example_inputs).logits)


def test_a_peft_or_hugging_face_folder_given_to_load_is_told_what_it_is(tmp_path):
    """It was told to 'save it again from the CompiledModel', which it never was."""
    peft_dir, hf_dir = tmp_path / "bot", tmp_path / "hf"
    for folder, name in ((peft_dir, "adapter_config.json"), (hf_dir, "config.json")):
        folder.mkdir()
        (folder / name).write_text("{}")
    with pytest.raises(ArtifactError, match=r'PEFT adapter directory: a policy loads it with `adapt … from=".*bot"`'):
        slimfx.load(peft_dir)
    with pytest.raises(ArtifactError, match=r"Hugging Face model folder: compile it \(`slimfx compile SPEC --model"):
        slimfx.load(hf_dir)


@pytest.mark.parametrize("header", ["", "x", "xyz" * 7])
def test_loaded_weights_are_aligned_as_torch_allocates_them_whatever_the_header(tmp_path, header):
    """They lay in the file's mapping where the header's length put them: 11 bytes less header
    moved a BERT pooler's weight, and its batch-1 output came back 5e-8 off the saved model."""
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(37), "b": torch.randn(64, 64), "c": torch.randn(3)}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt", "pad": header})
    back = files.read_weights(tmp_path / "w.safetensors")
    assert all(t.data_ptr() % 64 == 0 and torch.equal(t, tensors[k]) for k, t in back.items())


def test_what_a_killed_save_left_in_place_is_replaced_by_the_next(tmp_path, saved):
    """A save filling a mount point in place and killed midway leaves its staging folder (and
    maybe some files): the next save refused the folder as "not a slimfx artifact". So did the
    save load() asks for after an artifact's meta.json was damaged."""
    cm = compiled("llama").cm
    staged = tmp_path / "staged"
    (staged / f"{atomic_dir.STAGING}{atomic_dir._HOST}-1-abc").mkdir(parents=True)
    (staged / "program.json").write_bytes((saved("llama") / "program.json").read_bytes())
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("program.json", "weights.safetensors"):
        (damaged / name).write_bytes((saved("llama") / name).read_bytes())
    (damaged / "meta.json").write_text('{"format": ')
    with pytest.raises(ArtifactError, match="meta.json is not valid JSON"):
        slimfx.load(damaged)
    for target in (staged, damaged):
        cm.save(target)
        assert sorted(p.name for p in target.iterdir()) == ["meta.json", "program.json", "weights.safetensors"]
        slimfx.load(target)
    # another tool's file under one of the names is still not taken for a save's leftovers
    other = tmp_path / "other"
    other.mkdir()
    (other / "program.json").write_text('{"format": "something else"}')
    with pytest.raises(ArtifactError, match="not a slimfx artifact"):
        cm.save(other)


def test_a_long_folder_name_is_saved_and_one_past_the_limit_refused_before_work(tmp_path):
    """The folder beside the target (`.NAME.tmp-HOST.PIDNS-PID-XXXXXXXX`) went past the 255-byte
    name limit once NAME had some 215: "File name too long" after the compile or the training."""
    cm = compiled("llama").cm
    for name in ("a" * 230, "é" * 120):  # 230 and 240 bytes: mkdir takes them
        cm.save(tmp_path / name)
        cm.save(tmp_path / name)  # over an existing one: the folder moved aside is named short too
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(ArtifactError, match="its name is 256 bytes long, past the 255"):
        cm.save(tmp_path / ("b" * 256))
    # a previous artifact a killed save (before names were shortened) moved aside is still found
    old = tmp_path / f".{'c' * 120}.old-abc"
    old.mkdir()
    assert atomic_dir.moved_aside(tmp_path / ("c" * 120)) == [old]
