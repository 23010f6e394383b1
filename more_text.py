"""More built-in English text for calibration: docstrings of standard-library modules that the
default text (evaluation.default_text, which `slimfx eval` scores part of) does not read, and
then the Python Language Reference's topics as `help()` shows them (pydoc_data.topics).

Why: `heal method=linear` fits a 576×576 map (for SmolLM2) from the calibration rows, and 3,072
tokens (the default calibration) are too few for it — fitted on the eval text itself the map
reaches ×1.03 of fp32 perplexity, on the default calibration ×1.278 (4 blocks removed). With
this text after the default (`compile(..., calib=25_000)`) it reaches ×1.235, and ×1.635 instead
of ×1.871 with 8 blocks removed (benchmarks/collapse.py --calib-tokens 25000, 2026-12-04;
benchmarks/README.md, collapse section). The LoRA heal gains from more text still: 8 blocks
removed, 600 steps, ×1.346 of fp32 on 75,000 tokens (the default's and the 48 modules of
MORE_SOURCES), ×1.310 on all of it (≈226k: FURTHER_SOURCES and the topics added;
benchmarks/README.md, collapse section).

Like the default text it needs no download, and it is the same run to run on one Python version;
a module a Python build lacks (ssl without OpenSSL; those 3.12 and 3.13 removed) is skipped. The
order is fixed and new text only ever goes after the old, so `calib=N` keeps its rows for every N
an earlier release could give.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings

from .evaluation import _clean

__all__ = ["more_texts", "MORE_SOURCES", "FURTHER_SOURCES"]

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
# Then every other module of Python 3.11's standard library with a docstring of MIN_WORDS+ words
# that neither list above reads (alphabetical, as measured; what a build lacks is skipped). Not read:
# modules that act on import (this, antigravity), GUI and test packages, installers.
FURTHER_SOURCES = (
    "abc", "aifc", "array", "asynchat", "asyncore", "builtins", "cProfile", "calendar", "cgi",
    "cgitb", "chunk", "codeop", "colorsys", "copy", "crypt", "csv", "ctypes", "curses", "datetime",
    "dbm", "decimal", "dis", "encodings", "enum", "errno", "fcntl", "filecmp", "fnmatch",
    "fractions", "functools", "gc", "genericpath", "getopt", "getpass", "gettext", "glob", "grp",
    "hashlib", "hmac", "html", "http", "imp", "importlib", "keyword", "linecache", "locale",
    "mailcap", "marshal", "mmap", "modulefinder", "nntplib", "ntpath", "numbers", "operator",
    "pathlib", "pickle", "pipes", "plistlib", "poplib", "posix", "posixpath", "pprint", "profile",
    "pstats", "pwd", "pyclbr", "quopri", "rlcompleter", "runpy", "secrets", "select", "signal",
    "site", "smtpd", "sndhdr", "spwd", "sqlite3", "stringprep", "struct", "sunau", "symtable",
    "sys", "sysconfig", "tabnanny", "telnetlib", "termios", "time", "trace", "tracemalloc",
    "types", "unicodedata", "warnings", "wave", "webbrowser", "wsgiref", "xml", "zipapp",
    "zipimport", "zlib",
)
MIN_WORDS = 30  # shorter docstrings are mostly a signature and a line


@functools.cache
def more_texts() -> tuple[str, ...]:
    """One text per docstring of MIN_WORDS+ words (each module's own, then its public classes and
    functions and their methods, in definition order), MORE_SOURCES then FURTHER_SOURCES, then
    one per Language Reference topic of MIN_WORDS+ words, by name; repeats dropped."""
    texts: list[str] = []
    seen: set[str] = set()
    docstrings = (inspect.getdoc(obj) or "" for name in (*MORE_SOURCES, *FURTHER_SOURCES)
                  for obj in _documented(_import(name)))
    for raw in (*docstrings, *_reference_topics()):
        if len(raw.split()) < MIN_WORDS:
            continue
        text = _clean(raw)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    if not texts:
        raise RuntimeError("standard-library docstrings are missing (python -OO?); pass your own "
                           "calibration text instead of a token count.")
    return tuple(texts)


def _import(name: str):
    """The module, or None where this Python build lacks it; deprecated modules warn on import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError:
        return None


def _reference_topics() -> list[str]:
    """The Language Reference's topics (what `help("assert")` prints), by topic name; none where
    a Python build lacks pydoc_data."""
    module = _import("pydoc_data.topics")
    return [] if module is None else [module.topics[k] for k in sorted(module.topics)]


def _documented(module) -> list:
    def public(owner) -> list:
        return [v for k, v in vars(owner).items() if not k.startswith("_")]

    if module is None:
        return []
    objs = [module]
    for value in public(module):
        if (inspect.isclass(value) or inspect.isfunction(value)) and getattr(value, "__module__", None) == module.__name__:
            objs.append(value)
            if inspect.isclass(value):
                objs.extend(v for v in public(value) if inspect.isfunction(v))
    return objs

