"""`--emit-kernels` listings: a folder an earlier listing wrote is cleared of exactly that
listing's kernel files, never of paths an edited index.txt names elsewhere."""
from __future__ import annotations

from graphs import capture

from slimfx.codegen.listing import INDEX, write_kernels


def test_rewriting_a_listing_removes_only_plain_names_inside_its_folder(tmp_path):
    graph = capture([("linear", [0]), ("relu", [1])])[0].graph
    folder = tmp_path / "kernels"
    write_kernels(graph, folder)
    outside, absolute, nested = tmp_path / "precious.py", tmp_path / "abs.py", folder / "sub"
    for f in (outside, absolute):
        f.write_text("keep")
    nested.mkdir()
    (nested / "deep.py").write_text("keep")
    (folder / "stale_kernel.py").write_text("old")
    index = folder / INDEX
    index.write_text(index.read_text() + f"  ../precious.py\n  {absolute}\n  sub/deep.py\n"
                     "  stale_kernel.py\n")
    summary = write_kernels(graph, folder)
    assert outside.read_text() == absolute.read_text() == (nested / "deep.py").read_text() == "keep"
    assert not (folder / "stale_kernel.py").exists()
    assert {f.name for f in folder.glob("*.py")} == {f"{name}.py" for name, _ in summary.listings}
