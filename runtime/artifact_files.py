"""Writing and reading an artifact's files: fsync, SHA-256, permissions, the places a save refuses
(atomic_dir.py puts the directory in place).

Files are written readable by group and others like any saved model (0666 less the umask,
so 0644 under the usual 022), the directory 0777 less the umask.
"""
from __future__ import annotations

import hashlib
import json
import errno
import os
import re
from pathlib import Path
from typing import Any

import torch

from .artifact_errors import RESAVE, WEIGHTS, ArtifactError
from .atomic_dir import STAGING, file_mode, write_atomic

__all__ = ["json_bytes", "write_bytes", "write_weights", "write_atomic", "foreign_entries", "holds_json", "sha256", "sha256_file",
           "read_json", "read_weights", "first_line", "file_mode", "unplaceable", "nearest_existing",
           "resolved_or_none", "PLACE_ERRORS", "LOOP"]


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
        # One key: the writer keeps metadata in a hash map whose order changes from one call to the
        # next, and two saves of one model differed in their bytes (meta.json names the writer).
        save_file(tensors, str(path), metadata={"format": "pt"})
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
                  if (e.name not in own or not e.is_file()) and not e.name.startswith(STAGING))


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
    if len(os.fsencode(target.name)) > 255:  # the usual file system limit (stat raises on it)
        return f"its name is {len(os.fsencode(target.name))} bytes long, past the 255 a file name may have"
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
        tensors = load_file(str(path))
    except Exception as e:  # SafetensorError, or OSError for unreadable headers
        raise ArtifactError(f"{path} is not a readable safetensors file ({first_line(e)}); "
                            f"{RESAVE}") from e
    # The tensors lie in the file's mapping wherever the header's length puts them; a matmul over
    # a weight that is not 64-byte aligned takes another kernel path and rounds otherwise (a BERT
    # pooler loaded 5e-8 off the saved model once the header was 11 bytes shorter). Where torch
    # itself would allocate them, 64-byte aligned, the loaded model computes bit for bit alike.
    return {name: t if t.data_ptr() % _ALIGNED == 0 else t.clone() for name, t in tensors.items()}


_ALIGNED = 64  # bytes: what torch's CPU allocator guarantees


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
