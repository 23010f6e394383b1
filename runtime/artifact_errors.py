"""The error every artifact problem raises, and the names of an artifact's files."""
from __future__ import annotations

__all__ = ["ArtifactError", "META", "PROGRAM", "WEIGHTS", "FILES", "RESAVE"]

META, PROGRAM, WEIGHTS = "meta.json", "program.json", "weights.safetensors"
FILES = (META, PROGRAM, WEIGHTS)
# A damaged artifact cannot save itself again: say where a good one comes from.
RESAVE = ("save it again from the CompiledModel (cm.save(path)), or compile the original model with its policy again "
          "(`slimfx compile … --out`)")


class ArtifactError(ValueError):
    """An artifact that load() refuses, or a model that save() cannot write. The message says
    what is wrong and what to do; the cause, if any, is chained."""
