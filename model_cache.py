"""The converted-model cache under `models.cache_dir()`: a fixture wheel's GGUF file dequantized
once into a plain safetensors folder (transformers reads that in a second; the GGUF takes ~30 s),
converted by one process at a time (a file lock) and published with one rename, so a reader sees
a whole folder or none, and a damaged one is converted again."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["CACHE_FILES", "cache_valid", "conversion_lock", "convert_gguf", "publish", "quiet_transformers"]

CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "slimfx-cache.json")


@contextmanager
def conversion_lock(target: Path):
    """Serialize conversions (pytest-xdist workers) so the 30 s job runs once, not per worker.

    Only an optimization: correctness comes from the atomic rename in `publish`, so where
    fcntl is missing (Windows) the lock is skipped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_valid(folder: Path) -> bool:
    """Every file there, and the weights' header whole: a damaged converted model (a truncated
    file) gave a bare SafetensorError on every load and was never converted again."""
    if not all((folder / f).is_file() for f in CACHE_FILES):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            weights.keys()
    except Exception:  # noqa: BLE001 - SafetensorError, OSError: either way not a usable cache
        return False
    return True


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize the GGUF once into a plain safetensors folder; publish it with one rename."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One-time cost (~30 s on 2 cores); the GGUF reader's own progress bar shows the rest.
    print(f"slimfx: converting {gguf_file.name} to {target} (once)", file=sys.stderr)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except ImportError as err:
        raise ImportError(f"converting {gguf_file.name} needs the gguf and accelerate packages "
                          f"(`pip install gguf accelerate`): {err}") from err
    # The weights are plain fp32 now; a config that still says "gguf" makes tools refuse it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.use_cache = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the published cache is for every user
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        stamp = {"source": gguf_file.name, "source_bytes": gguf_file.stat().st_size}
        (tmp / "slimfx-cache.json").write_text(json.dumps(stamp, indent=1))
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place; if another process won the race, keep its copy."""
    if target.exists() and not cache_valid(target):
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        try:
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # someone else moved it first
    try:
        os.rename(tmp, target)
    except OSError:
        if not cache_valid(target):
            raise


@contextmanager
def quiet_transformers():
    """Hide the per-tensor progress bars transformers prints while loading; restore afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
