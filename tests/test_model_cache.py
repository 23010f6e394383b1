"""model_cache.py: the converted-model cache is published whole or not at all, and a damaged one
is converted again."""
from __future__ import annotations

import torch

from slimfx import model_cache


def _cache_files(folder, tag: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    for name in model_cache.CACHE_FILES:
        (folder / name).write_text(tag)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"), metadata={"tag": tag})


def test_publish_keeps_the_winner(tmp_path):
    target, tmp = tmp_path / "m", tmp_path / "tmp"
    for folder, tag in ((target, "first"), (tmp, "second")):
        _cache_files(folder, tag)
    model_cache.publish(tmp, target)  # loses the race: the published copy stays
    assert (target / "config.json").read_text() == "first"


def test_publish_replaces_a_broken_cache(tmp_path):
    target, tmp = tmp_path / "m", tmp_path / "tmp"
    target.mkdir()
    (target / "config.json").write_text("half")
    _cache_files(tmp, "whole")
    model_cache.publish(tmp, target)
    assert (target / "config.json").read_text() == "whole"


def test_a_cache_with_damaged_weights_is_converted_again(tmp_path):
    """A truncated model.safetensors gave a bare SafetensorError on every load, never reconverted."""
    _cache_files(tmp_path / "m", "whole")
    assert model_cache.cache_valid(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    assert not model_cache.cache_valid(tmp_path / "m")
