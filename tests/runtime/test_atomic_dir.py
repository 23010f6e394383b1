"""runtime/atomic_dir.py: a target rename(2) cannot move (a mount point: EBUSY) is filled in place,
meta.json last, instead of failing after the whole compile with a raw OSError; a replaced folder
keeps its mode; a save killed between its renames is named at load and at the next save; the
umask is read, never set to 0 (another thread's file would be world-writable meanwhile)."""
from __future__ import annotations

import errno
import os
import stat
import warnings

import pytest
import torch

import slimfx
import slimfx.runtime.atomic_dir as atomic_dir
from runtime_tiny import compiled
from slimfx.runtime.artifact import ArtifactError


def _outputs_equal(a, b, inputs) -> bool:
    return torch.equal(a(**inputs).logits, b(**inputs).logits)


def _busy_when_moved(monkeypatch, target):
    """os.rename of `target` itself fails as it does for a mount point."""
    real = os.rename

    def rename(src, dst):
        if os.path.realpath(src) == os.path.realpath(target):
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real(src, dst)

    monkeypatch.setattr(atomic_dir.os, "rename", rename)


def test_a_target_that_cannot_be_moved_is_filled_in_place(tmp_path, monkeypatch):
    """`--out /out` on a Docker volume: the swap's first rename raised EBUSY, reported as a
    slimfx bug, and the compiled model was lost."""
    case = compiled("llama")
    target = tmp_path / "mnt"
    target.mkdir()
    inode = target.stat().st_ino
    _busy_when_moved(monkeypatch, target)
    case.cm.save(target)
    assert target.stat().st_ino == inode  # the same directory, filled
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "program.json", "weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]  # nothing left beside it
    assert _outputs_equal(slimfx.load(target), case.cm, case.loaded.example_inputs)
    case.cm.save(target)  # and again, over the artifact now there
    assert _outputs_equal(slimfx.load(target), case.cm, case.loaded.example_inputs)


def test_a_mount_point_is_filled_in_place_without_trying_to_move_it(tmp_path, monkeypatch):
    case = compiled("llama")
    target = tmp_path / "mnt"
    target.mkdir()
    monkeypatch.setattr(atomic_dir.os.path, "ismount", lambda p: os.path.realpath(p) == str(target.resolve()))
    monkeypatch.setattr(atomic_dir.os, "rename", lambda *a: pytest.fail(f"rename{a} of a mount point"))
    case.cm.save(target)
    assert _outputs_equal(slimfx.load(target), case.cm, case.loaded.example_inputs)


def test_in_place_meta_json_goes_last_so_a_mix_is_refused(tmp_path, monkeypatch):
    """Killed after the weights and program are replaced and before meta.json: load must refuse
    the mix (meta.json's hashes are the old files'), not run new weights under an old report."""
    case = compiled("llama")
    other = slimfx.compile(case.loaded, "quantize blocks.*.mlp.* int8", backend="eager")
    target = tmp_path / "mnt"
    case.cm.save(target)
    _busy_when_moved(monkeypatch, target)
    real = os.replace
    order = []

    def replace(src, dst):
        order.append(os.path.basename(dst))
        if os.path.basename(dst) == "meta.json":
            raise KeyboardInterrupt  # the kill
        return real(src, dst)

    monkeypatch.setattr(atomic_dir.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        other.save(target)
    assert order[-1] == "meta.json" and sorted(order) == ["meta.json", "program.json", "weights.safetensors"]
    assert not [p for p in target.iterdir() if p.name.startswith(atomic_dir.STAGING)]
    with pytest.raises(ArtifactError, match="does not match|bytes but meta.json records"):
        slimfx.load(target)


def test_a_killed_in_place_save_does_not_block_the_next(tmp_path):
    """Its staging directory inside the target is swept, not counted as a foreign entry."""
    case = compiled("llama")
    target = tmp_path / "mnt"
    case.cm.save(target)
    (target / f"{atomic_dir.STAGING}{atomic_dir._HOST}-999999999-abc").mkdir()  # no such process
    atomic_dir.write_atomic(target, lambda d: (d / "meta.json").write_text("{}"), last="meta.json")
    assert atomic_dir.STAGING not in " ".join(p.name for p in target.iterdir())


def test_a_replaced_folder_keeps_its_mode(tmp_path):
    """A shared folder (group-writable, setgid) became 0755 at the first save over it."""
    case = compiled("llama")
    target = tmp_path / "shared"
    case.cm.save(target)
    os.chmod(target, 0o2775)
    case.cm.save(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o2775


def test_a_save_killed_between_its_renames_is_named_at_load_and_at_the_next_save(tmp_path):
    """The previous artifact sat in `.a.old-*`, the only copy, while load said 'nothing is there'."""
    case = compiled("llama")
    aside = tmp_path / ".a.old-x1y2"
    case.cm.save(aside)
    with pytest.raises(ArtifactError, match=r"moved the previous one aside, to .*\.a\.old-x1y2; rename that back to a"):
        slimfx.load(tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case.cm.save(tmp_path / "a")
    said = [w for w in caught if ".a.old-x1y2" in str(w.message)]
    assert said and "rename it back" in str(said[0].message) and said[0].filename == __file__
    assert aside.is_dir()  # never deleted: it may be the user's only copy


def test_the_umask_is_read_without_setting_it(monkeypatch):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("the umask is read from /proc on Linux only")
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(atomic_dir.os, "umask", lambda *a: pytest.fail("os.umask called"))
        assert atomic_dir.file_mode() == 0o640 and atomic_dir.file_mode(directory=True) == 0o750
    finally:
        monkeypatch.undo()
        os.umask(old)


def _unwritable(monkeypatch, *folders):
    real = os.access
    denied = {str(f.resolve()) for f in folders}
    monkeypatch.setattr(atomic_dir.os, "access",
                        lambda p, mode, **kw: False if str(os.path.realpath(p)) in denied and mode & os.W_OK
                        else real(p, mode, **kw))


def test_a_folder_in_a_parent_this_user_cannot_write_is_filled_in_place(tmp_path, monkeypatch):
    """The temporary directory beside it could not be made: 'Permission denied' for a target the
    user can write."""
    case = compiled("llama")
    target = tmp_path / "shared" / "mine"
    target.mkdir(parents=True)
    _unwritable(monkeypatch, tmp_path / "shared")
    monkeypatch.setattr(atomic_dir.tempfile, "mkdtemp", _mkdtemp_refused_in(tmp_path / "shared"))
    case.cm.save(target)
    assert _outputs_equal(slimfx.load(target), case.cm, case.loaded.example_inputs)


def _mkdtemp_refused_in(folder):
    real = atomic_dir.tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == str(folder.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    return mkdtemp
