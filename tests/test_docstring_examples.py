"""Every `>>>` example in slimfx's docstrings runs, and prints what the docstring says.

The examples are the first thing a reader copies; run here they cannot drift from the code.
Modules are found by their text, so an example added anywhere is checked without listing it.
Each module's examples share one namespace: a tiny llama (`llama`, `ids`, `mask`), the usual
imports, and `tmp`, a fresh folder for what an example saves.
"""
from __future__ import annotations

import copy
import doctest
import importlib
from pathlib import Path

import pytest
import torch

import slimfx
from slimfx import models

ROOT = Path(slimfx.__file__).parent
SKIP = {"tests", "benchmarks", ".venv", "out"}


def _modules_with_examples() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or ">>>" not in path.read_text():
            continue
        parts = ("slimfx",) + rel.with_suffix("").parts
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    # The discovery itself must not silently find nothing (a moved root, a renamed package).
    assert {"slimfx.passes.calibrate", "slimfx.passes.capture", "slimfx.dsl.parser"} <= set(MODULES)


@pytest.fixture(scope="module")
def tiny_llama():
    return models.tiny("llama")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tiny_llama, tmp_path):
    module = importlib.import_module(name)
    peft = pytest.importorskip("peft") if name == "slimfx.runtime.peft_format" else None
    from slimfx.passes.capture import capture
    from slimfx.passes.rewrite import find_sites
    from slimfx.runtime.report import Report
    from slimfx.dsl.ast import Name, Path as SelectorPath, Selector, Slice

    inputs = tiny_llama.example_inputs
    namespace = {
        **vars(module), "torch": torch, "slimfx": slimfx, "copy": copy, "peft": peft,
        "capture": capture, "find_sites": find_sites, "Report": Report, "Selector": Selector,
        "Path": SelectorPath, "Name": Name, "Slice": Slice,
        "llama": tiny_llama.model, "ids": inputs["input_ids"], "mask": inputs["attention_mask"],
        "tmp": tmp_path,
    }
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, name, globs=namespace)
    assert tests, f"{name} has '>>>' in its text but no docstring example doctest can find"
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
