"""slimfx: a declarative model-graph rewriting compiler for PyTorch.

A policy file says how a model is compressed; `slimfx.compile(model, policy)` applies it.
Only the language is imported eagerly: `slimfx check` and `slimfx fmt` never import torch.
"""
from .dsl import Spec, Policy, SpecError, parse, parse_file, format_spec

__version__ = "0.1.0"
__all__ = ["parse", "parse_file", "format_spec", "SpecError", "Spec", "Policy", "__version__"]
