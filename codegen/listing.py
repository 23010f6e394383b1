"""`slimfx compile --emit-kernels DIR`: every kernel the Triton backend would generate for a graph,
written for reading — one file per distinct source (`<name>.py`, its header naming each group of
graph nodes it replaces) and `index.txt` (the counts, and the groups left to eager ops with why).
Nothing here launches or imports a kernel, so it runs without a GPU."""
from __future__ import annotations

from pathlib import Path

from torch import fx

from .lower import CodegenSummary, lower_graph

__all__ = ["write_kernels"]


def write_kernels(graph: fx.Graph, out: str | Path) -> CodegenSummary:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    _, summary = lower_graph(graph)
    for name, text in summary.listings:
        (folder / f"{name}.py").write_text(text)
    lines = [f"slimfx generated kernels: {summary}", "", "files:"]
    lines += [f"  {name}.py" for name, _ in summary.listings]
    if summary.eager:
        lines += ["", "groups left to eager ops:", summary.eager_reasons()]
    (folder / "index.txt").write_text("\n".join(lines) + "\n")
    return summary
