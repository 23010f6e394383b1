"""What every pass may read besides the graph: calibration batches, the policy source (for
errors at the right line), progress bars, and where to dump the graph between stages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..runtime.progress import Progress

__all__ = ["Context"]


@dataclass
class Context:
    calib: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    filename: str = "<policy>"
    progress: Progress = field(default_factory=Progress)  # silent unless the caller asked and has a terminal
    dump_dir: str | None = None  # when set, the graph is written here after each stage
