"""Writing and reading an artifact's files: atomic directory swap, fsync, SHA-256, permissions.

Files are written readable by group and others like any saved model (0666 less the umask,
so 0644 under the usual 022), the directory 0777 less the umask.
"""
from __future__ import annotations

import hashlib
import json
import errno
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .artifact_errors import RESAVE, WEIGHTS, ArtifactError

__all__ = ["json_bytes", "write_bytes", "write_weights", "write_atomic", "foreign_entries", "holds_json", "sha256", "sha256_file",
           "read_json", "read_weights", "first_line", "file_mode", "unplaceable", "nearest_existing",
           "resolved_or_none", "PLACE_ERRORS", "LOOP"]


def file_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def json_bytes(doc: Any, what: str, indent: int | None = 1) -> bytes:
    try:
        return json.dumps(doc, indent=indent, ensure_ascii=False,
                          separators=None if indent else (",", ":")).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"cannot write {what}: {e}; report figures and output constants "
                            "must be plain JSON values (str, int, float, bool, None, list, dict)"
                            ) from e


def write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, file_mode())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """safetensors written by its Rust writer straight to the file (no bytes object of the
    whole model in Python), then hashed back from the page cache: the faster of the two."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt", "writer": "slimfx"})
    except Exception as e:
        code = _os_error_code(e)
        if code is not None:  # a full disk is the machine's state: the OSError the callers explain
            raise OSError(code, os.strerror(code), str(path)) from e
        raise ArtifactError(f"cannot write {WEIGHTS}: {first_line(e)}") from e
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(path, file_mode())  # the writer may create it private
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# The Rust writer reports an I/O failure as text: "I/O error: No space left on device (os error 28)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# A full disk, a quota, a read-only or forbidden place: the machine's state, not a slimfx bug.
PLACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _os_error_code(e: Exception) -> int | None:
    """The errno of a full disk, a quota or a forbidden place in the safetensors writer's error."""
    found = _OS_ERROR.search(str(e))
    code = int(found.group(1)) if found else None
    return code if code in PLACE_ERRORS else None


def foreign_entries(target: Path, own: tuple[str, ...]) -> list[str]:
    """What a directory holds besides the files a save writes (`own`), a folder under one of
    their names included: write_atomic replaces the whole directory, so a save over it is
    refused while there are any."""
    if not target.is_dir():
        return []
    return sorted(e.name + ("/" if e.is_dir() else "") for e in target.iterdir()
                  if e.name not in own or not e.is_file())


def holds_json(file: Path, key: str, value: Any = None) -> bool:
    """Whether `file` is a JSON object with `key` (equal to `value` when one is given): what
    makes a folder one a save may replace. A file merely named meta.json was enough, and another
    tool's folder was replaced, its files lost."""
    try:
        doc = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and key in doc and (value is None or doc[key] == value)


def not_a_directory(target: Path) -> str | None:
    """Why an existing `target` is no directory to write into, or None. A device, pipe or socket
    was taken for a directory to replace: `--out /dev/null` as root swapped the device for an
    artifact, and a named pipe hung the save for ever."""
    if not target.exists() or target.is_dir():
        return None
    if target.is_file():
        return "it is a file; pass a directory path"
    return "it is not a directory (a device, pipe or socket); pass a directory path"


def unplaceable(target: Path) -> str | None:
    """Why write_atomic cannot replace `target`, or None: something that is not a directory, a
    symbolic link to nothing, or the current directory or one above it (the process and the
    user's shell would be left in a deleted directory)."""
    if (problem := not_a_directory(target)) is not None:
        return problem
    if target.is_symlink() and not target.exists():
        return (f"it is a symbolic link to {os.readlink(target)}, which does not exist; create that directory, "
                "or choose another path")
    real = resolved_or_none(target)
    if real is None:
        return LOOP
    cwd = Path.cwd().resolve()
    if real == real.parent or real in (cwd, *cwd.parents):
        where = "the current directory" if real == cwd else "above the current directory"
        return (f"it is {where}, which saving would replace (it replaces the whole directory); save from "
                "outside it, to a path that does not contain the current directory")
    return None


LOOP = ("a symbolic link on the way to it leads back to itself (a loop); mend the link, or choose "
        "another path")


def resolved_or_none(path: Path) -> Path | None:
    """`path` made absolute with every link followed, or None where links form a loop (pathlib
    raises RuntimeError for one in Python 3.11, OSError in later versions)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


def nearest_existing(path: Path) -> Path:
    """The nearest path above `path` that exists: where a mkdir of `path` starts, or a file in
    the way of it."""
    return next(p for p in path.absolute().parents if p.exists())


def write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Everything goes to a temporary directory next to `target`, is fsynced, then renamed
    into place; an existing artifact there is replaced only once the new one is complete, and
    a failed save leaves no partial directory behind. A symbolic link is saved through: the
    directory it names is replaced, the link stays."""
    target = target.resolve()  # `.`/`..` in it, and a link, name the directory that is replaced
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_killed_saves(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner()}-", dir=target.parent))
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp makes it private
        write(tmp)
        _fsync_dir(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


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


def _sweep_killed_saves(target: Path) -> None:
    """Delete the `.NAME.tmp-HOST-PID-*` directories that saves to `target` by processes no longer
    running on this machine left behind (each holds a whole model's weights). Never a `.old-`
    one: after a kill between the two renames it is the only copy of the previous artifact."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-{re.escape(_HOST)}-(\d+)-[a-z0-9_]+")
    for entry in target.parent.iterdir():
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


def _swap_into_place(tmp: Path, target: Path) -> None:
    """rename(2) cannot replace a non-empty directory: move the old one aside first, and back
    if the new one cannot take its place."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():  # a file in it that cannot be deleted (another user's, a busy mount)
        warnings.warn(f"the previous {target.name} is left at {old}: it could not be deleted all the way; "
                      "delete it yourself", stacklevel=5)  # the user's cm.save(…) / cm.save_adapters(…)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable enough
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path, data: bytes | None = None) -> Any:
    try:
        return json.loads((path.read_bytes() if data is None else data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {RESAVE}") from e
    except RecursionError:  # nested thousands deep: no file a save writes
        raise ArtifactError(f"{path} is not an artifact's JSON: it is nested too deeply; {RESAVE}") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (already hashed): a Rust parser, no pickle."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, or OSError for unreadable headers
        raise ArtifactError(f"{path} is not a readable safetensors file ({first_line(e)}); "
                            f"{RESAVE}") from e


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
