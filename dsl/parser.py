"""Policy text -> Spec (the AST). The first stage of the pipeline, and the only one that sees text.

parse() runs the Lark LALR parser, turns the tree into frozen dataclasses, checks every value
against its rule's schema, attaches comments for the formatter, and runs the static checks of
dsl/check.py. Whatever it is given, only SpecError comes out.
"""
from __future__ import annotations

import ast as pyast
import dataclasses
import functools
import os
import re
import threading
import unicodedata
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from . import ast as A
from .errors import Diagnostic, SpecError, source_lines
from .syntax_errors import _WORD, syntax_error
from .trivia import attach_trivia
from .validate import validate_spec

__all__ = ["parse", "parse_file", "unreadable", "grammar_text", "lark_parser", "INLINE_POLICY"]

# The name of the one policy that rules parsed with bare=True make.
INLINE_POLICY = "inline"

# Deeper alternatives than this are never meant, and would only exhaust Python's stack.
MAX_NESTING = 32


def grammar_text() -> str:
    return resources.files("slimfx.dsl").joinpath("policy.lark").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def lark_parser(start: str = "start") -> Lark:
    """The policy parser; start="bare_rules" parses rules with no `policy NAME { }` around them."""
    return Lark(grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True, start=start,
                maybe_placeholders=True, lexer_callbacks={"COMMENT": _collect_comment})


# Comments are %ignored by the grammar; the lexer hands them here so `fmt` can keep them.
# Thread-local, because the one cached Lark instance may serve several threads.
_seen = threading.local()


def _collect_comment(token: Token) -> Token:
    comments = getattr(_seen, "comments", None)
    if comments is not None:  # None when someone parses with lark_parser() directly
        comments.append(token)
    return token


def parse(text: str | bytes, *, filename: str = "<policy>", check: bool = True, bare: bool = False) -> A.Spec:
    """Parse policy text into a Spec. With bare=True the text is rules alone, with no
    `policy NAME { }` around them: one policy named `inline`, every position the text's own.

    >>> spec = parse("policy p {\\n  quantize head int8\\n}")
    >>> spec.policy("p").rules[0].format
    'int8'
    >>> parse("quantize head int8", bare=True).policies[0].name
    'inline'
    """
    source = _decode(text, filename)
    try:
        return _parse_source(source, filename, check, "bare_rules" if bare else "start")
    except SpecError:
        raise
    except Exception as e:  # a bug of ours: still a SpecError, but one that says so
        raise SpecError.at("internal", f"slimfx failed on this policy ({type(e).__name__}: {e}); "
                           "please report it with the policy text", source=source, filename=filename) from e


def _parse_source(source: str, filename: str, check: bool, start: str) -> A.Spec:
    tree, comments = _parse_tree(source, filename, start)
    spec = _to_ast(tree, source, filename, start)
    spec = validate_spec(spec)
    spec = attach_trivia(spec, comments)
    if check:
        from .check import check_spec

        check_spec(spec)
    return spec


def parse_file(path, *, check: bool = True) -> A.Spec:
    """parse() the file at `path`; an unreadable file is a SpecError too."""
    if not isinstance(path, (str, bytes, os.PathLike)):  # an int is a file descriptor to open(): 0 read stdin
        raise TypeError(f"parse_file takes a path (a str, bytes or os.PathLike), not the {type(path).__name__} "
                        f"{path!r}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise unreadable(path, e) from e
    return parse(data, filename=str(path), check=check)


def unreadable(path, error: OSError) -> SpecError:
    """The no-file error for a policy path that cannot be read; a compiled artifact's folder
    given for the policy is named as one ("Is a directory" said nothing of it)."""
    hint = "pass the path of an existing .slim file"
    if os.path.isfile(os.path.join(path, "meta.json")):
        hint = ("it is a saved compiled model (an artifact), not a policy file: its policy is in its meta.json "
                "(slimfx.load(dir).policy_text); pass a .slim file")
    return SpecError.at("no-file", f"cannot read {path}: {error.strerror or error}", filename=str(path), hint=hint)


def _decode(text: str | bytes, filename: str) -> str:
    if isinstance(text, str):
        return text.lstrip("\ufeff")
    if not isinstance(text, (bytes, bytearray)):
        raise SpecError.at("encoding", f"a policy is text or bytes, not {type(text).__name__}",
                           filename=filename)
    try:
        return bytes(text).decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        # In characters, after the BOM, with the line shown (the bad byte as U+FFFD): a byte
        # column counted the BOM and each byte of "é", under an empty line
        data = bytes(text)
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        line = data.count(b"\n", 0, e.start) + 1
        start = max(data.rfind(b"\n", 0, e.start) + 1, bom)
        column = len(data[start:e.start].decode("utf-8", "replace")) + 1
        raise SpecError.at("encoding", f"byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8",
                           line=line, column=column, filename=filename,
                           source=data[bom:].decode("utf-8", "replace")) from None


def _parse_tree(source: str, filename: str, start: str):
    parser = lark_parser(start)
    _seen.comments = comments = []
    try:
        tree = _parse_whole_words(parser, source, filename)
    except UnexpectedInput as e:
        raise syntax_error(e, source, filename, parser) from None
    finally:
        _seen.comments = None
    return tree, comments


_WORD_CHAR = re.compile(r"[A-Za-z0-9_]")


def _parse_whole_words(parser: Lark, source: str, filename: str):
    """parser.parse(source), except that no word is split in two. Where no name may stand, Lark's
    contextual lexer matches a keyword at the start of a longer word: `quantize head int8group=64`
    read as `int8 group=64`, `policyp {` as `policy p {`. Such a word is reported whole, as the
    name it is, against what the parser expected there."""
    interactive = parser.parse_interactive(source)
    last = None
    try:
        for token in interactive.iter_parse():  # each token is yielded before it is fed
            if token.type in ("NUMBER", "INT") and last is not None and _WORD_CHAR.match(source, token.end_pos or 0) \
                    and (str(last) == "=" or (str(last) == "<=" and _BY.match(source, token.end_pos))):
                # a parameter's value; a budget's bound running into `by` (`avg_bits<=5by`) was read
                # as `5 by`, silently (a unit after the bound, `<=40MB`, is the grammar's to check)
                _not_a_number(source, filename, token)
            if token.type != "NAME" and _WORD_CHAR.match(source, token.end_pos or 0) and _WORD.fullmatch(token):
                name = Token.new_borrow_pos("NAME", _WORD.match(source, token.start_pos).group(), token)
                interactive.copy().feed_token(name)  # raises UnexpectedToken as if the lexer had read a name
                raise UnexpectedToken(name, {t for t in interactive.choices() if t.isupper()})
            last = token
        return interactive.feed_eof(last)
    except (UnexpectedToken, UnexpectedCharacters) as e:
        # iter_parse leaves it unset; syntax_errors asks it which terminals really fit here (a
        # character the lexer cannot read listed every look-ahead of the merged LALR state)
        if getattr(e, "interactive_parser", None) is None:
            e.interactive_parser = interactive
        raise


def _not_a_number(source: str, filename: str, token: Token):
    """A number running into letters (`0x10`, `1_000`, `16abc`): it was read as the number then a
    name, "`x10` has no value; write `x10=<value>`"."""
    text = _NUMBERISH.match(source, token.start_pos).group()
    hint = "write a decimal number, e.g. `16`, `1000`, `0.5` or `1e-3`"
    number = _DECIMAL.match(text)
    rest = text[number.end():] if number else ""
    if rest and _WORD.fullmatch(rest) and source.startswith("=", token.start_pos + len(text)):
        # `lr=1e-3steps=3` said "`1e` is not a number": the next parameter runs into the value
        hint = f"put a space between `{number.group()}` and `{rest}=`"
    elif rest == "by":  # a budget's bound running into `by`
        hint = f"put a space between `{number.group()}` and `by`"
    raise SpecError(Diagnostic("syntax", f"`{text}` is not a number", token.line, token.column, len(text), hint),
                    source, filename)


# A word that starts as a number; an exponent's sign stays in it (`1e-3steps`, not `1e`).
_NUMBERISH = re.compile(r"[+-]?(?:[eE][+-](?=[0-9])|[A-Za-z0-9_.])+")
_BY = re.compile(r"by(?![A-Za-z0-9_])")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


# Python's string escapes. Another (`"C:\models"`) Python keeps as it is, with a warning that the
# filter in force prints, hides or raises: the same text read three ways. Checked here, not by
# changing the warnings filter, which is the whole process's (the parser serves threads).
# An octal escape is up to three digits; past \377 Python warns too (`"\777"`).
_ESCAPE = re.compile(r"\\([0-7]{1,3}|.)", re.S)
_KNOWN_ESCAPES = set("\n\\'\"abfnrtvxNuU")


def _check_escapes(literal: str) -> None:
    for m in _ESCAPE.finditer(literal):
        escape = m.group(1)
        if escape[0] in "01234567":
            if int(escape, 8) > 0o377:
                raise SyntaxError(f"invalid octal escape sequence '\\{escape}'")
        elif escape not in _KNOWN_ESCAPES:
            raise SyntaxError(f"invalid escape sequence '\\{escape}'")


def _to_ast(tree, source: str, filename: str, start: str) -> A.Spec:
    try:
        policies = _AstBuilder().transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            if e.orig_exc.kind == "too-deep":  # at the first brace past the limit, as a RecursionError is:
                raise _too_deep(source, filename, start) from None  # the innermost too-deep node moved with depth
            raise SpecError(e.orig_exc.diagnostics, source, filename) from None
        if not isinstance(e.orig_exc, RecursionError):
            raise
        raise _too_deep(source, filename, start) from None
    except RecursionError:
        raise _too_deep(source, filename, start) from None
    policies = [dataclasses.replace(p, source=source, filename=filename) for p in policies]
    return A.Spec(tuple(policies), source=source, filename=filename)


def _too_deep(source: str, filename: str, start: str) -> SpecError:
    line, column = _deep_brace(source, policy_brace=start == "start")
    return SpecError.at("too-deep", f"selector alternatives nested deeper than {MAX_NESTING} levels",
                        line=line, column=column, source=source, filename=filename)


def _deep_brace(source: str, policy_brace: bool) -> tuple[int, int]:
    """Line and column of the first `{` nested past MAX_NESTING (the policy's own brace counts,
    where there is one)."""
    depth = 0
    for line_no, text in enumerate(source_lines(source), 1):
        quoted, escaped = False, False  # braces in a "string" or a # comment are no nesting
        for col, char in enumerate(text, 1):
            if quoted:
                quoted, escaped = (escaped or char != '"'), (not escaped and char == "\\")
                continue
            if char == "#":
                break
            quoted = char == '"'
            depth += (char == "{") - (char == "}")
            if depth > MAX_NESTING + policy_brace:
                return line_no, col
    return 0, 0


def _span(meta) -> A.Span:
    return A.Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(tok: Token) -> A.Span:
    return A.Span(tok.line, tok.column, tok.end_line, tok.end_column)


@v_args(meta=True)
class _AstBuilder(Transformer):
    """Lark tree -> AST nodes. Values keep their written type; validate.py coerces them."""

    def start(self, meta, children):
        return children

    def policy(self, meta, children):
        name, *rules = children
        return A.Policy(str(name), tuple(rules), span=_span(meta))

    def bare_rules(self, meta, children):
        # The rules' own span: Lark's reached over the newlines around them, and the printer then
        # had no place for a comment on the first line or after the last rule (fmt lost it)
        if not children:
            return [A.Policy(INLINE_POLICY, (), span=A.NO_SPAN)]
        first, last = children[0].span, children[-1].span
        return [A.Policy(INLINE_POLICY, tuple(children),
                         span=A.Span(first.line, first.column, last.end_line, last.end_column))]

    # ---- rules
    def collapse(self, meta, children):
        selector, auto, *params = children
        return A.Collapse(selector, _auto_of(auto, "collapse"), tuple(params), span=_span(meta))

    def drop(self, meta, children):
        selector, auto, *params = children
        return A.Drop(selector, _auto_of(auto, "drop"), tuple(params), span=_span(meta))

    def adapt(self, meta, children):
        selector, method, *params = children
        return A.Adapt(selector, str(method), tuple(params), span=_span(meta))

    def quantize(self, meta, children):
        selector, fmt, *params = children
        return A.Quantize(selector, str(fmt), tuple(params), span=_span(meta))

    def precision(self, meta, children):
        selector, *rest = children
        i = next(i for i, c in enumerate(rest) if isinstance(c, A.Budget))
        choices, budget, metric, params = rest[:i], rest[i], rest[i + 1], rest[i + 2:]
        return A.Precision(selector, tuple(choices), budget, str(metric), tuple(params), span=_span(meta))

    def tokens(self, meta, children):
        selector, action, *params = children
        return A.Tokens(selector, str(action), tuple(params), span=_span(meta))

    def unpad(self, meta, children):
        return A.Unpad(tuple(children), span=_span(meta))

    def keep(self, meta, children):
        selector, *params = children
        return A.Keep(selector, tuple(params), span=_span(meta))

    def heal(self, meta, children):
        return A.Heal(tuple(children), span=_span(meta))

    # ---- rule parts
    def auto(self, meta, children):
        return (tuple(c for c in children if c is not None), _span(meta))

    def choice(self, meta, children):
        fmt, *params = children
        return A.FormatChoice(str(fmt), tuple(params), span=_span(meta))

    def budget_bits(self, meta, children):
        return A.Budget("avg_bits", _number(children[0]), None, span=_span(meta))

    def budget_bytes(self, meta, children):
        limit, unit = children
        return A.Budget("bytes", _number(limit), str(unit) if unit else None, span=_span(meta))

    def param(self, meta, children):
        name, value = children
        return A.Param(str(name), value, span=_span(meta))

    def number(self, meta, children):
        return _number(children[0])

    def true(self, meta, children):
        return True

    def false(self, meta, children):
        return False

    def ident(self, meta, children):
        return str(children[0])

    def string(self, meta, children):
        tok = children[0]
        value = None
        bad = _unwritable(str(tok))  # a raw NUL stops literal_eval with a message about Python source
        if bad is None:
            try:
                _check_escapes(str(tok))
                value = pyast.literal_eval(str(tok))
            except SyntaxError as e:  # `\xZZ`, `\N{nonsense}`, `\m`: an escape Python refuses
                detail = e.msg.rsplit(": ", 1)[-1]  # not "(unicode error) 'unicodeescape' codec can't …"
                raise SpecError(Diagnostic("syntax", f"a string with a bad escape ({detail})", tok.line, tok.column,
                                           len(tok), "write `\\\\` for a backslash, or `/` in a path")) from None
            bad = _unwritable(value)
        if bad is not None:
            what = "a surrogate" if unicodedata.category(bad) == "Cs" else "a control character"
            raise SpecError(Diagnostic("syntax", f"a string holding {what} ({ascii(bad)[1:-1]})", tok.line,
                                       tok.column, len(tok), "remove it: a string value is printable text"))
        return value

    # ---- selectors
    def selector(self, meta, children):
        path, class_filter = children[0], (children[1] if len(children) > 1 else None)
        return A.Selector(path, class_filter, span=_span(meta))

    def class_filter(self, meta, children):
        return str(children[0])

    def path(self, meta, children):
        return A.Path(tuple(children))

    def name(self, meta, children):
        return A.Name(str(children[0]), children[1] if len(children) > 1 else None)

    def star(self, meta, children):
        return A.Star()

    def globstar(self, meta, children):
        return A.GlobStar()

    def alternatives(self, meta, children):
        if _depth(children) > MAX_NESTING:
            raise SpecError(Diagnostic("too-deep", f"selector alternatives nested deeper than "
                                       f"{MAX_NESTING} levels", meta.line, meta.column))
        return A.Alternatives(tuple(children))

    def item(self, meta, children):
        return A.Item(_int(children[0]))

    def slice(self, meta, children):
        start, stop, step = (_int(c) if c is not None else None for c in children)
        return A.Slice(start, stop, step)


def _auto_of(auto, rule: str) -> A.Auto | None:
    if auto is None:
        return None
    params, span = auto
    return A.Auto(rule, params, span=span)


def _number(tok: Token) -> int | float:
    text = str(tok)
    if any(c in text for c in ".eE"):
        return float(text)  # a float of any length reads, as `inf` at the most: validate refuses that
    return _int(tok)


# Python refuses to read an integer of more than 4300 digits (640 where a program lowers the
# limit), and far fewer make a float overflow. No count, index or size in a policy comes near this.
MAX_DIGITS = 500


def _int(tok: Token) -> int:
    digits = len(str(tok).lstrip("+-"))
    if digits > MAX_DIGITS:
        raise SpecError(Diagnostic("out-of-range", f"a number of {digits} digits is too large (a policy's "
                                   f"numbers have at most {MAX_DIGITS})", tok.line, tok.column, len(tok)))
    return int(str(tok))


def _unwritable(text: str) -> str | None:
    """The first character `fmt` could not write back, if any: a surrogate cannot be encoded as
    UTF-8, and of the control characters the printer escapes only `\\n` and `\\r` (a tab prints as
    itself and re-parses). A path or name never needs the others."""
    return next((c for c in text if unicodedata.category(c) == "Cs"
                 or (unicodedata.category(c) == "Cc" and c not in "\t\n\r")), None)


def _depth(paths) -> int:
    """Nesting depth of alternatives below these paths (1 for `{a,b}`)."""
    inner = [seg for p in paths for seg in p.segments if isinstance(seg, A.Alternatives)]
    return 1 + max((_depth(s.options) for s in inner), default=0)
