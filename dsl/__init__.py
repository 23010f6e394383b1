"""The policy language: grammar, AST, parser, printer and static checks. Imports no torch."""
from .ast import Spec, Policy
from .errors import SpecError, Diagnostic
from .parser import parse, parse_file
from .printer import format_spec

__all__ = ["Spec", "Policy", "SpecError", "Diagnostic", "parse", "parse_file", "format_spec"]
