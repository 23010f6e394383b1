"""slimfx: a declarative model-graph rewriting compiler for PyTorch.

A policy file says how a model is compressed; `slimfx.compile(model, policy)` applies it.
Only the language is imported eagerly: `slimfx check` and `slimfx fmt` never import torch;
compile, plan, load and CompiledModel load torch on first use.
"""
# pytest imports the repository root's __init__.py while collecting tests/ (the root is a
# package); from a checkout folder whose name is not an identifier (`tmp.x1y2`) it has no parent
# package, and the relative import would fail every test. Imported as `slimfx`, it always has one.
if __package__:
    from .dsl import Policy, Spec, SpecError, format_spec, parse, parse_file
    from .runtime.version import __version__
__all__ = ["compile", "plan", "load", "parse", "parse_file", "format_spec", "SpecError", "Spec", "Policy",
           "CompiledModel", "train", "__version__"]

_LAZY = {"compile": "api", "plan": "api", "load": "api", "CompiledModel": "runtime.compiled",
         "train": "runtime.train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimfx' has no attribute {name!r}")
