"""The error every artifact problem raises, and the names of an artifact's files."""
from __future__ import annotations

__all__ = ["ArtifactError", "META", "PROGRAM", "WEIGHTS", "FILES", "RESAVE"]

META, PROGRAM, WEIGHTS = "meta.json", "program.json", "weights.safetensors"
FILES = (META, PROGRAM, WEIGHTS)
RESAVE = "re-save the model with cm.save(path)"


class ArtifactError(ValueError):
    """An artifact that load() refuses, or a model that save() cannot write. The message says
    what is wrong and what to do; the cause, if any, is chained."""
