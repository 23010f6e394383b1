"""Lark's UnexpectedInput -> a SpecError a person can act on.

The message says what was expected in words ("a bit format such as `int8` or `int4` after
`quantize <selector>`"), offers a did-you-mean for misspelt keywords, and names a fix for the
mistakes people make most (two rules on one line, a rule outside a policy, an unclosed block).
"""
from __future__ import annotations

import re

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from .errors import Diagnostic, SpecError, did_you_mean, source_lines
from .schema import ADAPTERS, FORMATS, SCHEMAS, SIZE_UNITS, TOKEN_ACTIONS

__all__ = ["syntax_error", "RULE_KEYWORDS"]

RULE_KEYWORDS = ("collapse", "drop", "adapt", "quantize", "precision", "tokens", "keep", "heal")
_TOKENS_FORMS = ("after", "unpad")  # the words that may follow `tokens`
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARAM_START = re.compile(r"[A-Za-z_][A-Za-z0-9_]*[\t \f]*=")
_SELECTOR_START = re.compile(r"[\t \f]*([A-Za-z_*{])")

# Terminals with more than one spelling: what to call them, and the words they accept.
_WORD_CLASSES = {
    "FORMAT": ("a bit format such as `int8` or `int4`", FORMATS),
    "ADAPTER": ("an adapter kind, `lora` or `dora`", ADAPTERS),
    "ACTION": ("a token action, `prune` or `merge`", TOKEN_ACTIONS),
    "SIZE_UNIT": ("a size unit (B, KB, MB, GB, KiB, MiB, GiB)", tuple(SIZE_UNITS)),  # `10kb`: `KB`
}
_DESCRIPTIONS = {
    "NAME": "a name", "INT": "an integer", "NUMBER": "a number", "STRING": "a quoted string",
    "_NL": "the end of the line", "$END": "the end of the file",
}
# Terminals that only continue a selector: mentioned last, as "or more of the selector".
_SELECTOR_CONTINUATIONS = {"DOT", "LSQB", "COLON"}


def syntax_error(e: UnexpectedInput, source: str, filename: str, parser: Lark) -> SpecError:
    words = _terminal_words(parser)
    expected = _accepted(e) or set(getattr(e, "expected", None) or getattr(e, "allowed", None) or ())
    got = _got(e)
    line, column = max(1, getattr(e, "line", 1) or 1), max(1, getattr(e, "column", 1) or 1)
    earlier = _earlier_cause(expected, words, source, line, column) or \
        _valueless_param(got, expected, source, line, column) or \
        _missing_part(e, expected, words, source, line, column)
    if earlier:
        kind, message, hint, got, column = earlier
    else:
        kind, message, hint = _explain(e, got, expected, words, source, line, column)
    width = len(got) if got and _WORD.fullmatch(got) else 1
    return SpecError(Diagnostic(kind, message, line, column, width, hint), source, filename)


def _accepted(e: UnexpectedInput) -> set[str]:
    """The terminals the parser takes at the error, exactly. LALR merges look-ahead sets, so
    `e.expected` can list what it refuses one step later: after `quantize *` it listed `,`, `}`,
    a name and the line's end (a `*` inside `{a, *}` takes them)."""
    interactive = getattr(e, "interactive_parser", None)
    if interactive is None:
        return set()
    try:
        return set(interactive.accepts())
    except Exception:  # lark's own trial feeding failed: fall back to its look-ahead set
        return set()


def _earlier_cause(expected, words, source, line, column):
    """(kind, message, hint, word, column) for errors the parser notices only after their cause."""
    text = _line(source, line)
    start = _rule_start(text, column)
    first = _WORD.match(text, start)
    if not first or column <= first.end():
        return None
    second = _WORD.search(text, first.end())
    if (first.group() == "heal" and expected == {"EQUAL"} and second and second.group() not in SCHEMAS["heal"]
            and len(_WORD.findall(text[start: column - 1])) == 2):  # `heal blocks[3] …`
        return ("syntax", "`heal` takes no selector, only `name=value` parameters",
                "write e.g. `heal method=linear`: it repairs what the `collapse` or `drop` rules above it removed",
                second.group(), second.start() + 1)
    if first.group() == "tokens" and second and column > second.start():
        return _after_tokens(text, second, column)
    return None


def _valueless_param(got, expected, source, line, column):
    """`rank alpha=16`, `prune keep score=norm`, `auto(ratio, count=2)`: a parameter of the rule
    followed by the next one (or a `,`, `)` or `}`) without its value. Lark stops at what follows
    ("expected `=`, got `alpha`"); the caret goes under the parameter that lacks it (a parameter
    last on its line is _missing_part's, the caret after it)."""
    if expected != {"EQUAL"} or not (_WORD.fullmatch(got or "") or got in (",", ")", "}")):
        return None
    text = _line(source, line)
    before = _word_before(text, column)
    if not before:
        return None
    if before.group(1) not in _own_params(text, column):
        return _stray_word(text, before)
    name = before.group(1)
    return (*_no_value(name), name, before.start(1) + 1)


def _word_before(text: str, column: int) -> re.Match | None:
    """The word that ends just before `column` (spaces between), its span in group 1."""
    return re.search(r"([A-Za-z_][A-Za-z0-9_]*)[ \t\f]*$", text[: column - 1])


def _stray_word(text: str, word: re.Match, at_end: bool = False):
    """A word where the rule takes a `name=value` parameter that is none of its parameters there:
    told "`embed` has no value; write `embed=<value>`" (`keep head embed`), the user wrote it and
    was refused again. Says what the word may have meant: a second selector (`keep {head,embed}`),
    a value of one of the rule's parameters alone (`prune attention`: `score=attention`), a second
    format or adapter kind, or a missing `,` between the formats of `choose {…}`."""
    name, column = word.group(1), word.start(1) + 1
    keyword = _rule_keyword(text, column)
    if keyword is None or (name in RULE_KEYWORDS and not at_end):  # `… keep embed`: _explain's "follows"
        return None
    if name in RULE_KEYWORDS:  # `quantize head int8 keep`: told "`keep` has no value"
        return ("syntax", f"`{name}` is not a parameter of `{keyword}`: it starts a rule, and a rule starts a line",
                f"write `{name} …` on a line of its own", name, column)
    specs = _own_specs(text, column)
    before = text[_rule_start(text, column): word.start(1)]
    chosen = before.rfind("choose")
    if keyword == "precision" and name in FORMATS and chosen >= 0 and "}" not in before[chosen:]:
        last = [w for w in _WORD.findall(before[chosen:]) if w in FORMATS][-1]  # the format, not its parameter
        return ("syntax", f"expected `,` between the formats of `choose {{…}}`, got `{name}`",
                f"write `{last}, {name}`: each format a choice, parameters after its own format", name, column)
    action = next((w for w in _WORD.findall(before) if w in TOKEN_ACTIONS), "")
    what = f"`tokens after … {action}`" if keyword == "tokens" and action else f"`{keyword}`"
    owner = next((spec.name for spec in specs.values() if name in spec.choices), None)
    if owner is not None:
        return ("syntax", f"`{name}` is not a parameter of {what}: it is a value of `{owner}`",
                f"write `{owner}={name}`", name, column)
    words = before.split()
    if keyword in ("quantize", "adapt") and len(words) == 3 and name in (FORMATS if keyword == "quantize" else ADAPTERS):
        kind = "format" if keyword == "quantize" else "adapter kind"
        return ("syntax", f"`{name}` is not a parameter of `{keyword}`: the rule takes one {kind}, `{words[2]}` here",
                "to let compile choose among formats write `precision <selector> choose {" + f"{words[2]}, {name}" +
                "} budget … by output_mse`" if keyword == "quantize" else f"write one of `{words[2]}` and `{name}`",
                name, column)
    takes = f"it takes {', '.join(f'`{n}`' for n in specs)}" if specs else "it takes no parameters"
    if name in SCHEMAS.get(f"{keyword}.auto", {}):
        hint = f"`{name}` is a parameter of `auto(…)`: write it inside the parentheses, `{name}=<value>`"
    elif keyword in ("keep", "drop", "collapse") and len(words) == 2:
        hint = f"a rule takes one selector; to name several write a set: `{keyword} {{{words[1]},{name}}}`"
    elif keyword == "precision" and name in SCHEMAS["choice"]:
        hint = f"`{name}` is a format's: write it after its format inside `choose {{…}}`, e.g. `int4 {name}=<value>`"
    else:
        hint = f"remove `{name}`, or write a parameter as `name=value`"
    return "syntax", f"`{name}` is not a parameter of {what} ({takes})", hint, name, column


def _no_value(name: str) -> tuple[str, str, str]:
    return "missing-value", f"`{name}` has no value", f"write `{name}=<value>`"


def _after_tokens(text: str, second: re.Match, column: int):
    """`tokens unpad <selector>`."""
    word = second.group()
    start = _SELECTOR_START.match(text, second.end())
    if word == "unpad" and start and not _PARAM_START.match(text, start.start(1)) and column > start.start(1):
        selector = _WORD.match(text, start.start(1))
        return ("syntax", "`tokens unpad` takes no selector (and no parameters)",
                "write `tokens unpad` alone, above the first `tokens after` rule: it unpads the whole batch",
                selector.group() if selector else start.group(1),
                start.start(1) + 1)
    return None


def _got(e: UnexpectedInput) -> str:
    if isinstance(e, UnexpectedToken):
        return "" if e.token.type == "$END" else str(e.token)
    if isinstance(e, UnexpectedCharacters):
        return e.char
    return ""


def _terminal_words(parser: Lark) -> dict[str, tuple[str, ...]]:
    """Terminal name -> the literal words it stands for (`COLLAPSE` -> ("collapse",))."""
    out = {name: words for name, (_, words) in _WORD_CLASSES.items()}
    for term in parser.terminals:
        if type(term.pattern).__name__ == "PatternStr":
            out[term.name] = (term.pattern.value,)
    return out


def _explain(e, got, expected, words, source, line, column):
    """(kind, message, hint) for one syntax error."""
    context = _rule_context(source, line, column)
    expected = _relevant(expected, words, source, line, column)
    keyword_words = sorted({w for t in expected for w in words.get(t, ()) if _WORD.fullmatch(w)})
    if isinstance(e, UnexpectedToken) and e.token.type == "$END":
        return _unexpected_end(source, expected, words)
    if got in RULE_KEYWORDS and "POLICY" in expected:
        return ("syntax", f"`{got}` rule outside a policy",
                "rules go inside a block: `policy NAME {` on one line, the rules, then `}`")
    before = _previous_word(source, line, column)
    if expected == {"EQUAL"} and got == "(" and before == "auto":  # it said "expected `=`, got `(`"
        return ("syntax", "a rule takes one `auto(…)`", "put every search parameter in it, e.g. "
                "`auto(count=2, score=angular)`")
    if expected == {"EQUAL"} and _WORD.fullmatch(got) and before in RULE_KEYWORDS:
        return ("syntax", f"`{got}` follows `{before}` on the same line", "write one rule per line")
    if _WORD.fullmatch(got or "") and keyword_words and "NAME" not in expected:
        suggestion = did_you_mean(got, keyword_words)
        if suggestion or got not in keyword_words:
            message = f"expected {_phrase(expected, words)}{context}, got `{got}`"
            return ("unknown-keyword" if suggestion else "syntax", message, suggestion)
    # `layers.3.mlp` lexes `3.` as one NUMBER, so `got` is not always all digits
    index = re.match(r"[0-9]+", got)
    if index and _char_before(source, line, column) == ".":
        return ("syntax", "a number after `.` in a selector",
                f"index with brackets: `{_bracketed(source, line, column) or f'name[{index.group()}]'}`")
    if isinstance(e, UnexpectedToken) and e.token.type == "_NL":  # it printed the character '\n'
        return ("syntax", f"expected {_phrase(expected, words)}{context}, got the end of the line",
                "`policy NAME {` and each rule stay on one line: join this line and the next")
    shown = f"`{got}`" if got and got.isprintable() and not got.isspace() else _describe_char(got)
    return ("syntax", f"expected {_phrase(expected, words)}{context}, got {shown}", None)


def _missing_part(e, expected, words, source, line, column):
    """(kind, message, hint, word, column) when a rule's line (or the file, or a one-line
    policy's `}`) ends where the rule needs more: a parameter without its value, `quantize head`
    without a format; else None."""
    if not isinstance(e, UnexpectedToken) or "_NL" in expected:
        return None
    text = _line(source, line)
    if e.token.type == "$END":  # lark places the file's end at the last token's start
        column = len(text.rstrip()) + 1
    # lark places a line's end after its comment: the rule's text ends before the comment
    # (`group # the group size` said "`size` has no value", the caret after the comment)
    column = min(column, len(text[:_code_end(text)].rstrip()) + 1)
    start = _rule_start(text, column)
    closes_policy = e.token.type == "RBRACE" and not _open_braces(text[start: column - 1])
    if e.token.type not in ("_NL", "$END") and not closes_policy:
        return None
    keyword = _rule_keyword(text, column)
    # `}` is what the rule lacks when it would close a `{…}` set left open on this line
    wanted = _relevant(expected, words, source, line, column) - {"$END"}
    if not _open_braces(text[start: column - 1]):
        wanted.discard("RBRACE")
    if keyword not in RULE_KEYWORDS or not wanted:
        return None
    before = _previous_word(source, line, column)
    if before and text[: column - 1].rstrip().endswith("="):
        return (*_no_value(before), "", column)
    word = _word_before(text, column) if before and wanted == {"EQUAL"} else None
    if word and word.group(1) not in _own_params(text, column):
        return _stray_word(text, word, at_end=True)
    if before and wanted == {"EQUAL"}:
        return (*_no_value(before), "", column)
    lines = source_lines(source)
    following = _WORD.match(lines[line].lstrip()) if line < len(lines) and not closes_policy else None
    wrapped = following is not None and any(following.group() in words.get(t, ()) for t in wanted)
    return ("missing-value", f"the `{keyword}` rule ends before its required part: expected "
            f"{_phrase(wanted, words)}{_rule_context(source, line, column)}",
            f"a rule stays on one line: `{following.group()} …` on line {line + 1} belongs on this one"
            if wrapped else None, "", column)


_STRING = re.compile(r'"([^"\\\r\n]|\\[^\r\n])*"')


def _code_end(text: str) -> int:
    """Where the line's comment starts (a `#` outside a quoted string), else its length."""
    i = 0
    while i < len(text):
        if text[i] == "#":
            return i
        string = _STRING.match(text, i) if text[i] == '"' else None
        i = string.end() if string else i + 1
    return len(text)


def _unexpected_end(source, expected, words):
    open_policy = re.findall(r"^\s*policy\s+([A-Za-z_]\w*)", source, re.M)
    if "RBRACE" in expected and open_policy:
        return ("syntax", f"the file ends inside policy `{open_policy[-1]}`",
                "close the block with `}` on a line of its own")
    return ("syntax", f"the file ends too early; expected {_phrase(expected, words)}", None)


def _phrase(expected: set[str], words: dict[str, tuple[str, ...]]) -> str:
    """Expected terminals in words, most telling first."""
    rules = sorted(t for t in expected if (words.get(t) or ("",))[0] in RULE_KEYWORDS)
    parts = []
    if rules:
        parts.append("a rule (" + ", ".join(f"`{k}`" for k in RULE_KEYWORDS) + ")")
    for t in sorted(expected - set(rules) - _SELECTOR_CONTINUATIONS, key=_order):
        if t in _WORD_CLASSES:
            parts.append(_WORD_CLASSES[t][0])
        elif t in _DESCRIPTIONS:
            parts.append(_DESCRIPTIONS[t])
        elif t in words:
            parts.append(f"`{words[t][0]}`")
        else:
            parts.append(t.lower())
    # Only the continuations the parser takes here: after `*` a `[` is not one, and the message
    # listed it while refusing it (`quantize *[0] int8`).
    glyphs = [g for t, g in (("DOT", "`.`"), ("LSQB", "`[`"), ("COLON", "`:`")) if t in expected]
    if glyphs:
        listed = ", ".join(glyphs[:-1]) + (" or " if len(glyphs) > 1 else "") + glyphs[-1]
        parts.append(f"more of the selector ({', '.join(glyphs)})" if parts else listed)
    if not parts:
        return "nothing more here"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _order(terminal: str) -> tuple[int, str]:
    # Word classes first (they are what the user most likely meant), line ends last.
    rank = 0 if terminal in _WORD_CLASSES else 2 if terminal in ("_NL", "$END", "RBRACE") else 1
    return rank, terminal


def _rule_context(source: str, line: int, column: int) -> str:
    """" after `quantize <selector>`" when the error sits after a rule's selector."""
    text = _line(source, line)
    start = _rule_start(text, column)
    first = _WORD.match(text, start)
    if not first or first.group() not in RULE_KEYWORDS or first.group() in ("keep", "heal"):
        return ""
    keyword = first.group()
    if keyword == "tokens":  # `tokens after <selector>`: the selector comes after the second word
        second = _WORD.search(text, start + len(keyword))
        if second and second.group() != "after" and column == second.start() + 1:  # `tokens unpadd`
            return " after `tokens`"
        if not second or second.group() != "after":
            return ""
        keyword, start = "tokens after", second.start() - len("tokens ")
    if column <= start + len(keyword) + 1:
        return ""
    return f" after `{keyword} <selector>`"


def _relevant(expected: set[str], words, source: str, line: int, column: int) -> set[str]:
    """Drop what LALR's merged look-ahead sets add but this spot cannot take: `policy` where a
    rule may start, and the word classes of other rules (no `lora` after `quantize <selector>`)."""
    out = set(expected)
    if any((words.get(t) or ("",))[0] in RULE_KEYWORDS for t in out):
        out.discard("POLICY")
    keyword = _rule_keyword(_line(source, line), column)
    own = {"quantize": "FORMAT", "adapt": "ADAPTER", "tokens": "ACTION"}.get(keyword)
    if keyword in RULE_KEYWORDS:
        out -= {t for t in ("FORMAT", "ADAPTER", "ACTION") if t != own}
    return out or set(expected)


def _line(source: str, line: int) -> str:
    lines = source_lines(source)
    return lines[line - 1] if 0 < line <= len(lines) else ""


# A one-line policy (`policy small { quantize blocks.*.** : Linear int8 }`): its rule starts after
# the header's brace, and a `{` of a selector or a `choose` set starts no rule.
_POLICY_HEADER = re.compile(r"\bpolicy[\t \f]+[A-Za-z_][A-Za-z0-9_]*[\t \f]*\{")


def _rule_start(text: str, column: int) -> int:
    """Where the rule holding `column` starts in its line (its first word): after the last
    `policy NAME {` header before the column, else at the line's first word."""
    start = 0
    for header in _POLICY_HEADER.finditer(text, 0, max(0, column - 1)):
        start = header.end()
    return start + len(text[start:]) - len(text[start:].lstrip())


def _own_params(text: str, column: int) -> set[str]:
    """The parameters the rule holding `column` takes there: inside its `auto(…)` the search's,
    inside a `choose { … }` a format choice's, elsewhere the rule's own (`keep` is one of
    `tokens after … prune`'s as well as a rule of its own). Where the word sits counts: `drop
    blocks auto(count=2) ratio` was told "`ratio` has no value", and `ratio=0.5` there is refused."""
    return set(_own_specs(text, column))


def _own_specs(text: str, column: int) -> dict:
    """_own_params' names -> their ParamSpecs."""
    keyword = _rule_keyword(text, column)
    before = text[_rule_start(text, column): column - 1]
    opened = max(before.rfind("auto("), before.rfind("auto ("))
    if opened >= 0 and ")" not in before[opened:]:
        return dict(SCHEMAS.get(f"{keyword}.auto", {}))
    chosen = before.rfind("choose")
    if keyword == "precision" and chosen >= 0 and "{" in before[chosen:] and "}" not in before[chosen:]:
        return dict(SCHEMAS["choice"])
    words = set(_WORD.findall(before))
    specs: dict = {}
    for key, schema in SCHEMAS.items():
        base, _, form = key.partition(".")
        if base == keyword and form != "auto" and (not form or form in words):
            specs.update(schema)
    return specs


def _rule_keyword(text: str, column: int) -> str | None:
    """The first word of the rule holding `column` (`quantize`), not of its line (`policy`)."""
    m = _WORD.match(text, _rule_start(text, column))
    return m.group() if m else None


def _open_braces(rule_text: str) -> bool:
    """A `{` in this part of a rule that no `}` closes yet (`keep blocks.{q,v`)."""
    return rule_text.count("{") > rule_text.count("}")


def _char_before(source: str, line: int, column: int) -> str:
    lines = source_lines(source)
    if not 0 < line <= len(lines) or column < 2:
        return ""
    return lines[line - 1][column - 2: column - 1]


_SELECTOR_TEXT = re.compile(r"[A-Za-z0-9_.*\[\]{},]*")
_DOT_INDEX = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.([0-9]+)(?![A-Za-z0-9_\[])")


def _bracketed(source: str, line: int, column: int) -> str | None:
    """The selector around the error with `.3` written `[3]` (`model.layers[3].mlp`), or None
    when that still would not parse (`blocks.3.5`)."""
    lines = source_lines(source)
    if not 0 < line <= len(lines):
        return None
    text = lines[line - 1]
    start = column - 1
    while start > 0 and _SELECTOR_TEXT.fullmatch(text[start - 1]):
        start -= 1
    selector = _SELECTOR_TEXT.match(text, start).group()
    fixed = _DOT_INDEX.sub(r"\1[\2]", selector)
    if re.search(r"(^|[.\]])[0-9]", fixed) or fixed.count("{") != fixed.count("}"):  # `{q, v}`: cut at the space
        return None
    return fixed


def _previous_word(source: str, line: int, column: int) -> str | None:
    lines = source_lines(source)
    if not 0 < line <= len(lines):
        return None
    before = _WORD.findall(lines[line - 1][: column - 1])
    return before[-1] if before else None


def _describe_char(char: str) -> str:
    if not char:
        return "nothing"
    return f"the character {char!r} (U+{ord(char[0]):04X})"
