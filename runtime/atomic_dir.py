"""Putting a directory of files in place so that a reader sees the old set or the new one.

The usual way: write everything to a temporary directory beside the target, fsync, then swap
the directories by rename(2). Where the target itself cannot be renamed — a mount point (a
Docker volume, a mounted disk: EBUSY), a directory in a parent this user cannot write — the
files are written to a staging directory inside it and each replaces its namesake, the file
named `last` at the end; a save killed midway there leaves a mix its reader must refuse (an
artifact's meta.json holds the other files' hashes), never one it takes for the new set.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Callable

__all__ = ["write_atomic", "file_mode", "moved_aside", "STAGING"]

# The staging directory inside a target that cannot be swapped: a save's own entry, which the
# refusal of foreign entries does not count.
STAGING = ".slimfx-staging-"
# A rename of the target that these refuse is retried by writing inside it.
_CANNOT_MOVE = frozenset({errno.EBUSY, errno.EXDEV})


def file_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """Read, not set: os.umask(0) to learn it left a moment in which another thread's new file
    was world-writable. Linux says it in /proc; elsewhere it is set to 022 and back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(target: Path, write: Callable[[Path], None], last: str | None = None) -> None:
    """Everything goes to a temporary directory next to `target`, is fsynced, then renamed
    into place; an existing directory there is replaced only once the new one is complete (its
    mode, owner and group kept), and a failed save leaves no partial directory behind. A
    symbolic link is saved through: the directory it names is replaced, the link stays. A
    target that cannot be renamed is filled in place instead (see the module's docstring)."""
    target = target.resolve()  # `.`/`..` in it, and a link, name the directory that is replaced
    target.parent.mkdir(parents=True, exist_ok=True)
    if _fill_in_place(target):
        _write_inside(target, write, last)
        return
    _sweep_killed_saves(target.parent, f".{_short(target.name)}.tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{_short(target.name)}.tmp-{_owner()}-", dir=target.parent))
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp makes it private
        write(tmp)
        _fsync_dir(tmp)
        if not _swap_into_place(tmp, target):  # the target refused to move after all
            _move_inside(tmp, target, last)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the swap took it
    _fsync_dir(target.parent)
    _warn_moved_aside(target)


# Of the 255 bytes a file name may have, what a target's name takes in the names of the folders
# beside it (`.NAME.tmp-HOST.PIDNS-PID-XXXXXXXX` holds some 100 bytes more): a 230-byte name that
# mkdir takes failed with "File name too long", after the compile or the training.
_NAME_BYTES = 100


def _short(name: str) -> str:
    """`name`, or a prefix of it and a digest of the whole where it is longer than _NAME_BYTES."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= _NAME_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return raw[:_NAME_BYTES - 13].decode("utf-8", "ignore") + "~" + digest


def _fill_in_place(target: Path) -> bool:
    """A target directory that rename(2) cannot move: a mount point, or one whose parent this
    user may not write (the temporary directory beside it could not be made)."""
    return target.is_dir() and (os.path.ismount(target) or not os.access(target.parent, os.W_OK | os.X_OK))


def _write_inside(target: Path, write: Callable[[Path], None], last: str | None) -> None:
    _sweep_killed_saves(target, STAGING)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING}{_owner()}-", dir=target))
    try:
        os.chmod(stage, file_mode(directory=True))
        write(stage)
        _fsync_dir(stage)
        _replace_files(stage, target, last)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_inside(done: Path, target: Path, last: str | None) -> None:
    """A complete set written beside a target that would not move: into a staging directory
    inside it (a copy where it is another file system), then in place file by file."""
    def move(stage: Path) -> None:
        for f in done.iterdir():
            shutil.move(str(f), str(stage / f.name))

    _write_inside(target, move, last)


def _replace_files(stage: Path, target: Path, last: str | None) -> None:
    names = sorted(p.name for p in stage.iterdir())
    for name in [n for n in names if n != last] + [n for n in names if n == last]:
        os.replace(stage / name, target / name)
    _fsync_dir(target)


# Who is writing a temporary directory: a save killed outright (kill -9, power loss) cannot
# delete its own, and a later save sweeps it only when that process is gone from this machine.
def _host() -> str:
    """This machine and pid namespace: containers that share a hostname (`--uts=host`) and a disk
    have pids of their own, and one must not sweep the other's save in progress."""
    try:
        space = f".{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        space = ""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) + space


_HOST = _host()


def _owner() -> str:
    return f"{_HOST}-{os.getpid()}"  # at each save: a forked process has a pid of its own


def _sweep_killed_saves(folder: Path, prefix: str) -> None:
    """Delete the `PREFIX HOST-PID-*` directories in `folder` that saves by processes no longer
    running on this machine left behind (each holds a whole model's weights). Never a `.old-`
    one: after a kill between the two renames it is the only copy of the previous artifact."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return
    pattern = re.compile(rf"{re.escape(prefix)}{re.escape(_HOST)}-(\d+)-[a-z0-9_]+")
    for entry in folder.iterdir():
        found = pattern.fullmatch(entry.name)
        if found and not entry.is_symlink() and entry.is_dir() and not _running(int(found.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def _swap_into_place(tmp: Path, target: Path) -> bool:
    """rename(2) cannot replace a non-empty directory: move the old one aside first, and back
    if the new one cannot take its place. False when the old one cannot be moved (EBUSY: a
    mount point os.path.ismount did not see, such as a bind mount of the same file system)."""
    if not target.exists():
        os.rename(tmp, target)
        return True
    _keep_folder_attributes(target, tmp)
    old = Path(tempfile.mkdtemp(prefix=f".{_short(target.name)}.old-", dir=target.parent))
    os.rmdir(old)
    try:
        os.rename(target, old)
    except OSError as e:
        if e.errno in _CANNOT_MOVE:
            return False
        raise
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():  # a file in it that cannot be deleted (another user's, a busy mount)
        warnings.warn(f"the previous {target.name} is left at {old}: it could not be deleted all the way; "
                      "delete it yourself", stacklevel=5)  # the user's cm.save(…) / cm.save_adapters(…)
    return True


def _keep_folder_attributes(old: Path, new: Path) -> None:
    """The replaced directory's mode (a shared folder's setgid bit, 2775), owner and group go to
    its replacement; only the owner or root may set them, so a refusal keeps the new ones."""
    st = old.stat()
    try:
        os.chmod(new, stat.S_IMODE(st.st_mode))
        if hasattr(os, "chown") and (st.st_uid, st.st_gid) != (os.stat(new).st_uid, os.stat(new).st_gid):
            os.chown(new, st.st_uid, st.st_gid)
    except PermissionError:
        pass


def moved_aside(target: Path) -> list[Path]:
    """The `.NAME.old-*` directories beside `target`: a save killed between its two renames
    left the previous set there, the only copy of it."""
    parent = target.absolute().parent
    if not parent.is_dir():
        return []
    # the full name too: saves before names were shortened left `.NAME.old-*` for long names
    prefixes = tuple({f".{_short(target.name)}.old-", f".{target.name}.old-"})
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink())


def _warn_moved_aside(target: Path) -> None:
    left = moved_aside(target)
    if left:
        warnings.warn(f"{', '.join(map(str, left))}: a save to {target.name} that was killed moved an earlier "
                      f"one aside there (a whole copy of it); delete it, or rename it back to keep it",
                      stacklevel=5)  # the user's cm.save(…) / cm.save_adapters(…)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable enough
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
