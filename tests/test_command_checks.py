"""command_checks.py, the commands' argument checks, one by one (the commands that call them are
tested in test_cli*.py): each bad argument is a UsageError that names it and says what to do."""
from __future__ import annotations

from argparse import Namespace

import os

import pytest

from slimfx.command_checks import (UsageError, check_apart, check_folder, check_listing_folder, check_not_nested,
                                   check_out, check_train_args)


def test_out_and_the_listing_must_not_overlap(tmp_path):
    out = str(tmp_path / "o")
    for listing in (out, out + "/kernels", str(tmp_path)):
        with pytest.raises(UsageError, match=r"overlap; write them to separate folders, e.g. --emit-kernels .*/o-kernels"):
            check_apart(out, listing)
    check_apart(out, str(tmp_path / "o-kernels"))


def test_a_folder_option_needs_directories_on_its_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match=r"--emit-kernels .*/f: it is a file; pass a directory path"):
        check_folder("--emit-kernels", str(tmp_path / "f"))
    with pytest.raises(UsageError, match=r"cannot write --emit-kernels .*/f/k: .*/f is a file, not a directory"):
        check_folder("--emit-kernels", str(tmp_path / "f" / "k"))
    check_folder("--emit-kernels", str(tmp_path / "new" / "k"))  # made when written


def test_a_pipe_is_no_folder_to_write(tmp_path):
    """It was taken for a directory: the kernels' folder swapped in for it."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UsageError, match=r"--emit-kernels .*/pipe: it is not a directory \(a device, pipe or socket\)"):
        check_folder("--emit-kernels", str(tmp_path / "pipe"))


def test_a_listing_folder_is_new_empty_or_a_listing(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="non-empty folder that no kernel listing wrote"):
        check_listing_folder(str(tmp_path / "mine"))
    (tmp_path / "empty").mkdir()
    check_listing_folder(str(tmp_path / "empty"))


def test_a_link_loop_is_named_for_each_option(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UsageError, match=r"cannot write --emit-kernels .*/a/k: a symbolic link .* loop"):
        check_folder("--emit-kernels", str(tmp_path / "a" / "k"))
    with pytest.raises(UsageError, match=r"cannot write --emit-kernels .*: a symbolic link .* loop"):
        check_apart(str(tmp_path / "o"), str(tmp_path / "a" / "k"))
    from slimfx.runtime.artifact_errors import ArtifactError
    with pytest.raises(ArtifactError, match="leads back to itself"):  # check_target's own message
        check_out(str(tmp_path / "a" / "o"))


@pytest.mark.parametrize("change, says", [({"steps": 0}, "--steps must be at least 1, got 0"),
                                          ({"seq": -1}, "--seq must be at least 1"),
                                          ({"lr": 0.0}, "--lr must be a positive finite number, got 0.0"),
                                          ({"lr": float("inf")}, "--lr must be a positive finite number"),
                                          ({"seed": 2**64}, r"--seed must be a whole number from -2\^63 to 2\^64-1"),
                                          ({"seed": -2**63 - 1}, "--seed must be a whole number")])
def test_train_arguments_are_checked(change, says):
    args = Namespace(**{"steps": 10, "batch": 2, "seq": 64, "lr": 1e-4, "seed": 0, **change})
    with pytest.raises(UsageError, match=says):
        check_train_args(args)
    for seed in (0, 2**64 - 1, -2**63):  # what torch.manual_seed takes
        check_train_args(Namespace(steps=10, batch=2, seq=64, lr=1e-4, seed=seed))


def test_train_out_inside_or_around_the_artifact_is_refused(tmp_path):
    """An artifact inside another: the outer one's next save refused its own folder."""
    art = str(tmp_path / "art")
    for out in (art + "/trained", str(tmp_path)):
        with pytest.raises(UsageError, match=r"--out .* is (inside|around) --compiled .*: one artifact would hold"):
            check_not_nested(out, art)
    check_not_nested(art, art)  # trained in place
    check_not_nested(art + "-trained", art)


def test_out_may_be_a_writable_folder_in_a_parent_that_is_not(tmp_path, monkeypatch):
    """The save fills such a folder in place (runtime/atomic_dir.py); the check asked the parent
    and refused. A folder that cannot be written itself is still refused."""
    parent, out = tmp_path / "shared", tmp_path / "shared" / "mine"
    out.mkdir(parents=True)
    real = os.access
    denied = {str(parent.resolve())}
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.realpath(p) in denied else real(p, mode, **kw))
    check_out(str(out))
    with pytest.raises(UsageError, match="shared/new is not writable|shared is not writable"):
        check_out(str(parent / "new"))
    denied.add(str(out.resolve()))
    with pytest.raises(UsageError, match="mine is not writable"):
        check_out(str(out))


def test_a_place_where_no_folder_can_be_made_is_refused_before_any_work(monkeypatch):
    """access() says yes to root for any place: `--out /proc/x` passed the checks and the save
    failed after the whole compile (ENOENT). A folder is made and removed there first."""
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: True)  # as for root
    with pytest.raises(UsageError, match=r"cannot write --out /proc/slimfx-out: a folder cannot be made in /proc \("
                                         r".*\); choose a place this user can write"):
        check_out("/proc/slimfx-out")


def test_the_probe_folder_does_not_stay(tmp_path):
    check_out(str(tmp_path / "art"))
    check_folder("--emit-kernels", str(tmp_path))
    assert list(tmp_path.iterdir()) == []
