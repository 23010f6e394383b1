"""More built-in English text for calibration: docstrings of standard-library modules that the
default text (evaluation.default_text, which `slimfx eval` scores part of) does not read.

Why: `heal method=linear` fits a 576×576 map (for SmolLM2) from the calibration rows, and 3,072
tokens (the default calibration) are too few for it — fitted on the eval text itself the map
reaches ×1.03 of fp32 perplexity, on the default calibration ×1.278 (4 blocks removed). With
this text after the default (`compile(..., calib=25_000)`) it reaches ×1.235, and ×1.635 instead
of ×1.871 with 8 blocks removed (benchmarks/collapse.py --calib-tokens 25000, 2026-12-04; README,
collapse section).

Like the default text it needs no download, and it is the same run to run on one Python version;
a module a Python build lacks (ssl without OpenSSL) is skipped.
"""
from __future__ import annotations

import functools
import importlib
import inspect

from .evaluation import _clean

__all__ = ["more_texts", "MORE_SOURCES"]

# Modules of long prose docstrings present from Python 3.10 to 3.13 at least (none of those that
# 3.13 removed), alphabetical; none is one of the default text's sources (a test checks).
MORE_SOURCES = (
    "ast", "base64", "bdb", "bz2", "cmd", "code", "codecs", "collections", "compileall",
    "configparser", "dataclasses", "fileinput", "ftplib", "graphlib", "gzip", "imaplib", "io",
    "ipaddress", "itertools", "json", "logging", "lzma", "mimetypes", "optparse", "os", "pdb",
    "pickletools", "pkgutil", "platform", "py_compile", "queue", "re", "selectors", "shelve",
    "shutil", "smtplib", "socket", "socketserver", "ssl", "tarfile", "tempfile", "threading",
    "timeit", "tokenize", "traceback", "uuid", "weakref", "zipfile",
)
MIN_WORDS = 30  # shorter docstrings are mostly a signature and a line


@functools.cache
def more_texts() -> tuple[str, ...]:
    """One text per docstring of MIN_WORDS+ words: each module's own, then its public classes and
    functions and their methods, in definition order; repeats dropped."""
    texts: list[str] = []
    seen: set[str] = set()
    for name in MORE_SOURCES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in _documented(module):
            doc = inspect.getdoc(obj) or ""
            if len(doc.split()) < MIN_WORDS:
                continue
            text = _clean(doc)
            if text not in seen:
                seen.add(text)
                texts.append(text)
    if not texts:
        raise RuntimeError("standard-library docstrings are missing (python -OO?); pass your own "
                           "calibration text instead of a token count.")
    return tuple(texts)


def _documented(module) -> list:
    def public(owner) -> list:
        return [v for k, v in vars(owner).items() if not k.startswith("_")]

    objs = [module]
    for value in public(module):
        if (inspect.isclass(value) or inspect.isfunction(value)) and getattr(value, "__module__", None) == module.__name__:
            objs.append(value)
            if inspect.isclass(value):
                objs.extend(v for v in public(value) if inspect.isfunction(v))
    return objs

