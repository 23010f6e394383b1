"""`slimfx compile --emit-kernels DIR`: every kernel the Triton backend would generate for a graph,
written for reading — one file per distinct source (`<name>.py`, its header naming each group of
graph nodes it replaces) and `index.txt` (the counts, and the groups left to eager ops with why).
Nothing here launches or imports a kernel, so it runs without a GPU."""
from __future__ import annotations

import re
from pathlib import Path

from torch import fx

from .lower import CodegenSummary, lower_graph

__all__ = ["write_kernels", "INDEX"]

INDEX = "index.txt"
_LISTED = re.compile(r"[A-Za-z0-9_]+\.py")  # what this module names its files: nothing else is removed


def write_kernels(graph: fx.Graph, out: str | Path) -> CodegenSummary:
    """Write the listings into `out` (created if missing). A folder an earlier listing wrote
    loses that listing's files first, so no stale kernel stays beside the new ones; any other
    non-empty folder is refused."""
    folder = Path(out)
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / INDEX).is_file():
            raise FileExistsError(f"{folder} is a non-empty folder that no kernel listing wrote; choose a new or empty one")
        for line in (folder / INDEX).read_text().splitlines():
            # an index.txt edited by hand (or by someone else) may name ../x.py or /home/…:
            # only a plain kernel file name inside this folder is ours to remove
            if line.startswith("  ") and _LISTED.fullmatch(line.strip()):
                (folder / line.strip()).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    _, summary = lower_graph(graph)
    for name, text in summary.listings:
        (folder / f"{name}.py").write_text(text)
    lines = [f"slimfx generated kernels: {summary}", "", "files:"]
    lines += [f"  {name}.py" for name, _ in summary.listings]
    if summary.eager:
        lines += ["", "groups left to eager ops:", summary.eager_reasons()]
    (folder / INDEX).write_text("\n".join(lines) + "\n")
    return summary
