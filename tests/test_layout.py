"""The arrows of ../shared/LAYOUT.md that must never exist, read from every module's imports:
runtime never imports the compiler or the face, the language never imports torch, a pass never
imports another pass, and the graph core knows only the pass table (pipeline.py)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PASS_FOLDERS = sorted(p.name for p in (ROOT / "passes").iterdir() if p.is_dir() and (p / "__init__.py").exists())
FACE = {"api", "cli", "commands", "command_checks", "__main__", "plan_table"}


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", ".venv", "build") or rel.parts[0].startswith("."):
            continue
        yield rel


def imports_of(rel: Path) -> set[str]:
    """Dotted names (relative to the package root) of what the module imports, lazily or not."""
    package = list(rel.parent.parts)
    found = set()
    for node in ast.walk(ast.parse((ROOT / rel).read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                stem = ".".join([*base, *(node.module.split(".") if node.module else [])])
                found |= {f"{stem}.{a.name}".strip(".") for a in node.names} | {stem}
            elif node.module:
                found.add("ext:" + node.module)
        elif isinstance(node, ast.Import):
            found |= {"ext:" + a.name for a in node.names}
    return found


def test_the_walk_sees_the_layers():
    names = {str(m) for m in modules()}
    assert {"runtime/compiled.py", "passes/pipeline.py", "dsl/parser.py", "passes/precision/gptq.py"} <= names
    assert PASS_FOLDERS and "precision" in PASS_FOLDERS


@pytest.mark.parametrize("rel", [m for m in modules() if m.parts[0] == "runtime"], ids=str)
def test_runtime_needs_nothing_of_the_compiler(rel):
    bad = {i for i in imports_of(rel) if i.split(".")[0] in {"passes", "dsl", "codegen", *FACE}}
    assert not bad, f"{rel} imports {bad}: a saved model must load without the compiler"


@pytest.mark.parametrize("rel", [m for m in modules() if m.parts[0] == "dsl"], ids=str)
def test_the_language_never_imports_torch(rel):
    bad = {i for i in imports_of(rel) if i.startswith("ext:torch") or i.split(".")[0] in {"passes", "runtime"}}
    assert not bad, f"{rel} imports {bad}: `slimfx check` must stay torch-free"


@pytest.mark.parametrize("rel", [m for m in modules() if m.parts[0] == "passes"], ids=str)
def test_passes_keep_to_themselves(rel):
    own = rel.parts[1] if len(rel.parts) > 2 else None
    imported = {i.split(".")[1] for i in imports_of(rel) if i.startswith("passes.") and i.count(".") >= 1}
    other_passes = (imported & set(PASS_FOLDERS)) - {own}
    if rel.name == "pipeline.py" and own is None:
        return  # the one place that knows the pass table
    assert not other_passes, f"{rel} imports pass folder(s) {other_passes}"
    assert not {i for i in imports_of(rel) if i.split(".")[0] in FACE}, f"{rel} imports the face"
