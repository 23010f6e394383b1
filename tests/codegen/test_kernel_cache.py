"""The kernel cache (codegen/kernel.py): its files are imported as code, so the default folder is
the user's own and a folder anyone may write is refused; a cache file is written through a fresh
temporary file, never through a link planted at a predictable name."""
from __future__ import annotations

import os

import pytest

from slimfx.codegen.kernel import Kernel, cache_dir

SOURCE = "import triton\n\n\ndef kernel():\n    return 1\n"


def _kernel() -> Kernel:
    return Kernel("rows", SOURCE, [], [], [])


def test_the_default_folder_is_the_users_own(monkeypatch):
    monkeypatch.delenv("SLIMFX_KERNEL_CACHE", raising=False)
    assert cache_dir().name == f"slimfx-kernels-{os.getuid()}"


def test_a_folder_anyone_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by every user.*SLIMFX_KERNEL_CACHE"):
        _kernel().cached_file(shared)


def test_a_shared_folder_the_user_named_is_not_to_be_removed(tmp_path, monkeypatch):
    """SLIMFX_KERNEL_CACHE=/tmp was told "mode 777 … remove it": /tmp is 1777 and not slimfx's."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("SLIMFX_KERNEL_CACHE", str(shared))
    with pytest.raises(PermissionError) as info:
        _kernel().cached_file(shared)
    assert "(mode 1777)" in str(info.value) and "remove it" not in str(info.value)
    monkeypatch.delenv("SLIMFX_KERNEL_CACHE")
    with pytest.raises(PermissionError, match="remove it, or set SLIMFX_KERNEL_CACHE"):
        _kernel().cached_file(shared)


def test_a_link_at_the_old_temporary_name_is_not_written_through(tmp_path):
    cache, victim = tmp_path / "cache", tmp_path / "victim.txt"
    cache.mkdir(mode=0o700)
    victim.write_text("keep me")
    k = _kernel()
    (cache / f"{k.name}.py.{os.getpid()}.tmp").symlink_to(victim)  # where the old code wrote first
    path = k.cached_file(cache)
    assert path.read_text() == SOURCE and victim.read_text() == "keep me"
    assert sorted(p.name for p in cache.iterdir() if not p.is_symlink()) == [f"{k.name}.py"]


def test_a_damaged_cache_file_is_written_again(tmp_path):
    """A file that was not UTF-8 failed every Triton compile with UnicodeDecodeError: a cached file
    is used only when it is exactly the source, and any other is rewritten."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    k = _kernel()
    (cache / f"{k.name}.py").write_bytes(b"\xff\xfe damaged")
    assert k.cached_file(cache).read_text() == SOURCE


def test_a_file_where_the_cache_folder_should_be_is_named(tmp_path):
    """A bare FileExistsError ('File exists: afile') named neither the cache nor the variable."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="kernel cache .*afile is not a folder.*SLIMFX_KERNEL_CACHE"):
        _kernel().cached_file(tmp_path / "afile")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        _kernel().cached_file(tmp_path / "afile" / "below")
