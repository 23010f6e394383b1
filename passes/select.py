"""Selector resolution: a policy's `Selector` AST -> the concrete Targets/Blocks of a ModelGraph.

bind calls `resolve` for every rule before any pass runs, so a selector that matches nothing
fails with its line and column before the model is touched.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Iterable

from ..dsl.ast import Alternatives, GlobStar, Item, Name, Path, Segment, Selector, Slice, Star
from ..dsl.errors import SpecError, did_you_mean
from ..runtime.report import counted
from . import roles
from .graph import Block, ModelGraph, Target
from .graph_sizes import attrs_read

__all__ = ["resolve", "format_path"]


def resolve(graph: ModelGraph, selector: Selector, *, source: str = "",
            filename: str = "<policy>") -> list[Target | Block]:
    """Every Target or Block the selector names, de-duplicated, in model (execution) order.

    >>> g = capture(llama, {"input_ids": ids, "attention_mask": mask})
    >>> [t.path for t in resolve(g, Selector(Path((Name("blocks", Slice(0, 2)), Name("attn"), Name("q")))))]
    ['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']

    A selector that matches nothing raises SpecError(kind="selector") at `selector.span`,
    naming the closest real names at the level that failed.
    """
    return _Resolver(graph, selector, source, filename).run()


@dataclass(frozen=True)
class _Scope:
    """A place in the name tree: the root, a module, the canonical `blocks`, or a role group
    (`attn` inside block 3 is _Scope("role", "attn", 3))."""

    kind: str  # "root" | "module" | "blocks" | "role"
    key: str = ""
    block: int | None = None


_ROOT = _Scope("root")
_BLOCKS = _Scope("blocks")


class _Resolver:
    def __init__(self, graph: ModelGraph, selector: Selector, source: str, filename: str):
        self.g, self.sel, self.source, self.filename = graph, selector, source, filename
        self.roles: dict[int | None, list[str]] = {}
        for t in graph.targets.values():
            if t.role:
                self.roles.setdefault(t.block, []).append(t.role)

    def run(self) -> list[Target | Block]:
        scopes = self._walk([_ROOT], self.sel.path.segments, "")
        found = _dedupe(r for s in scopes for r in self._results(s))
        if not found:
            aliases = self._aliases(scopes)
            if aliases:
                named = ", ".join(f"`{a}` is `{t}`" for a, t in aliases[:3])
                more = f" and {len(aliases) - 3} more" if len(aliases) > 3 else ""
                raise self._error(f"`{self._text()}` names modules that the forward calls under "
                                  f"other paths ({named}{more}): a module reached by several "
                                  "paths is captured under the one its forward uses",
                                  hint="select them by the path the forward uses")
            direct = self._read_directly(scopes)
            if direct:  # an nn.Linear, yet "none of them is a linear" said nothing of why
                more = f" (and {len(direct) - 1} more like it)" if len(direct) > 1 else ""
                raise self._error(f"`{self._text()}` names `{direct[0]}`{more}, whose weight the forward reads itself "
                                  "(as F.multi_head_attention_forward reads nn.MultiheadAttention's out_proj), "
                                  "not by calling the module: slimfx rewrites module calls, so no rule can select it",
                                  hint="select other modules; to compress this one, write the model to call it")
            raise self._error(f"`{self._text()}` names modules, but none of them is a linear, "
                              "embedding, norm or conv used by the captured forward")
        if self.sel.class_filter:
            found = self._filter(found, self.sel.class_filter)
        return sorted(found, key=lambda r: (r.order, isinstance(r, Target)))

    # ---- walking the path ----
    def _walk(self, scopes: list[_Scope], segments: tuple[Segment, ...], label: str):
        for seg in segments:
            scopes = self._step(scopes, seg, label)
            label = f"{label}.{_seg_text(seg)}" if label else _seg_text(seg)
        return scopes

    def _step(self, scopes: list[_Scope], seg: Segment, label: str) -> list[_Scope]:
        if isinstance(seg, Star):
            out = [c for s in scopes for _, c in self._children(s)]
        elif isinstance(seg, GlobStar):
            out = self._descendants(scopes)
        elif isinstance(seg, Alternatives):
            out = [c for opt in seg.options for c in self._walk(scopes, opt.segments, label)]
        else:
            out = [c for s in scopes for n, c in self._children(s) if n == seg.name]
            if not out:
                raise self._no_name(scopes, seg.name, label)
            if seg.index is not None:
                out = self._index(out, seg.index, label + ("." if label else "") + seg.name)
        if not out:
            raise self._error(f"`{self._text()}` matches nothing: nothing under "
                              f"`{label or 'the model'}` for `{_seg_text(seg)}`")
        return _unique(out)

    def _descendants(self, scopes: list[_Scope]) -> list[_Scope]:
        out, seen, todo = [], set(), list(scopes)
        while todo:
            s = todo.pop(0)
            if s not in seen:
                seen.add(s)
                out.append(s)
                todo.extend(c for _, c in self._children(s))
        return out

    def _index(self, scopes: list[_Scope], index: Item | Slice, label: str) -> list[_Scope]:
        out = []
        for s in scopes:
            items = self._items(s)
            if items is None:
                continue
            out += self._pick(items, index, label)
        if not out and all(self._items(s) is None for s in scopes):
            what = self.g.modules[scopes[0].key].cls if scopes[0].kind == "module" else "group"
            raise self._error(f"`{label}` is a {what}, not a ModuleList/Sequential or `blocks`: "
                              "it cannot be indexed", hint="index `blocks` or a list module")
        return out

    def _pick(self, items: list[_Scope], index: Item | Slice, label: str) -> list[_Scope]:
        n = len(items)
        if isinstance(index, Item):
            if not -n <= index.index < n:
                said, hint = self._removals(label, n, lambda whole: -whole <= index.index < whole)
                raise self._error(f"index {index.index} is out of range: `{label}` has {counted(n, 'item')} "
                                  f"(valid {-n}..{n - 1}){said}", hint=hint)
            return [items[index.index]]
        if index.step == 0:
            raise self._error(f"slice step of `{label}` cannot be zero")
        outside = _outside(index, n)
        if outside is not None:
            # Python would clamp it: `drop blocks[20:28]` written for a deeper model removed fewer
            # blocks than it says, silently
            whole = f"{label}[{_slice_text(replace(index, **{outside[0]: None}))}]"
            said, hint = self._removals(label, n, lambda whole_count: _outside(index, whole_count) is None)
            raise self._error(f"slice [{_slice_text(index)}] of `{label}` reaches outside it: its {outside[0]} "
                              f"{outside[1]} is past the {counted(n, 'item')} `{label}` has (bounds {outside[2]})"
                              f"{said}; a slice is not cut short to fit",
                              hint=hint or f"write the bound that exists, e.g. `{whole}`")
        picked = items[index.start:index.stop:index.step]
        if not picked:
            raise self._error(f"slice [{_slice_text(index)}] of `{label}` is empty: it has {counted(n, 'item')} "
                              f"(valid indices {-n}..{n - 1})")
        return picked

    # ---- the name tree ----
    def _children(self, s: _Scope) -> list[tuple[str, _Scope]]:
        if s.kind == "root":
            return self._canonical_top() + self._module_children("")
        if s.kind == "blocks":
            return [(str(b.index), _Scope("module", b.path)) for b in self.g.blocks]
        if s.kind == "role":
            return self._role_children(s.key, s.block)
        block = self.g.block_of(s.key)
        groups = self._role_children("", block.index) if block and block.path == s.key else []
        return self._module_children(s.key) + groups

    def _canonical_top(self) -> list[tuple[str, _Scope]]:
        blocks = [("blocks", _BLOCKS)] if self.g.blocks else []
        return blocks + self._role_children("", None)

    def _module_children(self, path: str) -> list[tuple[str, _Scope]]:
        info = self.g.modules[path]
        return [(c, _Scope("module", f"{path}.{c}" if path else c)) for c in info.children]

    def _role_children(self, prefix: str, block: int | None) -> list[tuple[str, _Scope]]:
        head = f"{prefix}." if prefix else ""
        names = [r[len(head):].split(".")[0]
                 for r in self.roles.get(block, ()) if r.startswith(head)]
        return [(n, _Scope("role", head + n, block)) for n in dict.fromkeys(names)]

    def _items(self, s: _Scope) -> list[_Scope] | None:
        """The positional children of an indexable scope, else None."""
        if s.kind == "blocks" or (s.kind == "module" and self.g.modules[s.key].is_list):
            return [c for _, c in (self._children(s) if s.kind == "blocks"
                                   else self._module_children(s.key))]
        return None

    def _results(self, s: _Scope) -> list[Target | Block]:
        g = self.g
        if s.kind == "root":
            return list(g.targets.values())
        if s.kind == "blocks" or (s.kind == "module" and s.key == g.blocks_path):
            return list(g.blocks)
        if s.kind == "role":
            exact = [t for t in g.by_role(s.key) if t.block == s.block]
            return exact or [t for t in g.targets.values()
                             if t.block == s.block and (t.role or "").startswith(s.key + ".")]
        block = g.block_of(s.key)
        if block is not None and block.path == s.key:
            return [block]
        if s.key in g.targets:
            return [g.targets[s.key]]
        return [t for t in g.targets.values() if t.path.startswith(s.key + ".")]

    def _read_directly(self, scopes: list[_Scope]) -> list[str]:
        """The modules named that are linears etc. whose parameters the graph reads, yet that no
        call of the module uses (so they are no target)."""
        read = attrs_read(self.g)
        named = {s.key for s in scopes if s.kind == "module"}
        return sorted(path for path in named if path in self.g.modules and path not in self.g.targets
                      and roles.module_kind(self.g.modules[path].classes) is not None
                      and any(f"{path}.{p}" in read for p in ("weight", "bias")))

    def _aliases(self, scopes: list[_Scope]) -> list[tuple[str, str]]:
        """(path named, target path) for each module under `scopes` whose weights are a target's
        under another path (`self.blk = Block()` also listed in `self.layers`)."""
        by_storage = {tuple(p.storage for p in self.g.modules[t.path].params): t.path
                      for t in self.g.targets.values() if self.g.modules[t.path].params}
        keys = [s.key for s in scopes if s.kind == "module"]
        out = []
        for path, info in self.g.modules.items():
            if info.params and any(path == k or path.startswith(k + ".") for k in keys):
                target = by_storage.get(tuple(p.storage for p in info.params))
                if target is not None and target != path:
                    out.append((path, target))
        return out

    # ---- class filter ----
    def _filter(self, found: list, cls: str) -> list:
        kept = [r for r in found if self._is_a(r, cls)]
        if kept:
            return kept
        classes = list(dict.fromkeys(self.g.modules[r.path].cls for r in found))
        inside = [t for t in self.g.targets.values() if self._is_a(t, cls)
                  and any(t.path.startswith(r.path + ".") for r in found)]
        # `blocks[0] : Linear` asks whether the block itself is a Linear: "did you mean `Linear`?"
        # (the word written) said nothing; the modules inside are what was meant.
        hint = (f"`: {cls}` filters the matched modules themselves; for the {cls} modules inside them write "
                f"`{self._text()}.** : {cls}`" if inside else
                did_you_mean(cls, [c for c in dict.fromkeys(classes + ["Linear"]) if c != cls])
                or "the filter matches a class name or any base class (`Linear` also matches GPT-2's Conv1D)")
        raise self._error(f"`{self._text()}` matches {len(found)} module(s), but none is a `{cls}`; "
                          f"their classes: {', '.join(classes[:8])}", hint=hint)

    def _is_a(self, r: Target | Block, cls: str) -> bool:
        if cls == "Linear" and isinstance(r, Target) and r.kind == "linear":
            return True
        return cls in self.g.modules[r.path].classes

    # ---- errors ----
    def _no_name(self, scopes: list[_Scope], name: str, label: str) -> SpecError:
        fused = self._fused(scopes, name)
        if fused is not None:
            return fused
        if label == "" and name in ("head", "blocks"):
            return self._missing_top(name)
        names = list(dict.fromkeys(n for s in scopes for n, _ in self._children(s)))
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        where = f"under `{label}`" if label else f"at the top of {self.g.model_class}"
        listed = close or names[:12]
        kind = "closest" if close else "names there"
        hint = did_you_mean(name, names)
        if not label and any(n.isdigit() for n in names):
            # A top-level nn.Sequential's children are named `0`, `1`, …, which no selector can
            # start with (a path starts with a name; `net[0]` indexes a named parent).
            hint = ("children named by numbers (an nn.Sequential's) cannot start a selector: select them with "
                    "`*` and a class filter (`* : Linear`), or wrap the model in a module that names its child "
                    "(then `net[0]`)")
        return self._error(
            f"`{self._text()}` matches nothing: no `{name}` {where}; {kind}: "
            + (", ".join(f"`{n}`" for n in listed) or "none"),
            hint=hint)

    def _fused(self, scopes: list[_Scope], name: str) -> SpecError | None:
        """`attn.q` on a model whose q, k, v are one linear: say so and name `attn.qkv`; and the
        other way round, `attn.qkv` on one whose q, k, v are separate: name `attn.{q,k,v}`."""
        for s in scopes:
            role = f"{s.key}.{name}"
            parts = [p for p, (f, _) in roles.FUSED_ROLES.items() if f == role]
            split = [t for p in parts for t in self.g.by_role(p) if t.block == s.block] if s.kind == "role" else []
            if split:
                what = roles.FUSED_ROLES[parts[0]][1]
                written = f"{s.key}.{{{','.join(p.rpartition('.')[2] for p in parts)}}}"
                return self._error(
                    f"`{self._text()}`: {self.g.model_class} has no fused `{role}`: its {what} are separate "
                    f"linears ({', '.join(f'`{t.path}`' for t in split)})",
                    hint=f"select `{written}` for all of them")
            if s.kind != "role" or role not in roles.FUSED_ROLES:
                continue
            fused, what = roles.FUSED_ROLES[role]
            hits = [t for t in self.g.by_role(fused) if t.block == s.block]
            if hits:
                return self._error(
                    f"`{self._text()}`: {self.g.model_class} has no separate `{role}`: its {what} "
                    f"are fused into one linear (`{hits[0].path}`, role `{fused}`)",
                    hint=f"select `{fused}` instead; it holds all the fused projections")
        return None

    def _missing_top(self, name: str) -> SpecError:
        if name == "head":
            # only what this model has: `blocks[-1]` and `final_norm` were offered to a plain MLP
            roles = {t.role for t in self.g.targets.values()}
            offer = (["`blocks[-1]`"] if self.g.blocks else []) + (["`final_norm`"] if "final_norm" in roles else [])
            outside = [t.path for t in sorted(self.g.targets.values(), key=lambda t: t.order) if t.block is None]
            last = _selector_text(outside[-1]) if outside else None  # None: a number first (`2` of a Sequential)
            where = "outside the blocks " if self.g.blocks else ""
            path = f"a module path (the last module {where}is `{last}`)" if last else "a module path"
            return self._error(
                f"{self.g.model_class} has no head: no lm_head, classifier, score or pooler"
                + (", and no linear after the last block" if self.g.blocks else ""),
                hint=f"select {', or '.join(offer + [path])}")
        return self._error(
            f"{self.g.model_class} has no repeated blocks: no ModuleList of structurally "
            "identical modules holds the compute", hint="select modules by their paths")

    def _removals(self, label: str, left: int, fits) -> tuple[str, str | None]:
        """(what the message adds, the hint) for an index past the `left` blocks of `label`: the
        rules above that removed blocks and renumbered the rest are named where `label` names the
        blocks and the model had that index before them (`fits(count)`), else nothing."""
        names_blocks = label == "blocks" or (label and label == self.g.blocks_path)
        removed = getattr(self.g, "removed_count", 0) if names_blocks else 0
        if not removed or not fits(removed + left):
            return "", None
        return (f"; the rules above removed {removed} of the model's {removed + left} blocks",
                f"blocks are renumbered after a `drop` or `collapse`: `{label}[i]` below it is the i-th remaining "
                "block; write its index among those, or put this rule above the removal")

    def _error(self, message: str, hint: str | None = None) -> SpecError:
        span = self.sel.span
        width = span.end_column - span.column if span.end_line == span.line else 1
        return SpecError.at("selector", message, line=span.line, column=span.column,
                            width=max(1, width), hint=hint, source=self.source,
                            filename=self.filename)

    def _text(self) -> str:
        return format_path(self.sel.path)


# ---- small helpers ---------------------------------------------------------------------------


def _selector_text(path: str) -> str | None:
    """A module path as a selector writes it (`dec.1.c` is `dec[1].c`); None where a number comes
    first, which no selector can name."""
    parts = path.split(".")
    if parts[0].isdigit():
        return None
    out = []
    for part in parts:
        if part.isdigit():
            out[-1] += f"[{part}]"
        else:
            out.append(part)
    return ".".join(out)


def format_path(path: Path) -> str:
    """Selector text for messages: `blocks[0:4].attn.{q,v}`."""
    return ".".join(_seg_text(s) for s in path.segments)


def _seg_text(seg: Segment) -> str:
    if isinstance(seg, Star):
        return "*"
    if isinstance(seg, GlobStar):
        return "**"
    if isinstance(seg, Alternatives):
        return "{" + ",".join(format_path(p) for p in seg.options) + "}"
    if isinstance(seg.index, Item):
        return f"{seg.name}[{seg.index.index}]"
    if isinstance(seg.index, Slice):
        return f"{seg.name}[{_slice_text(seg.index)}]"
    return seg.name


def _outside(s: Slice, n: int) -> tuple[str, int, str] | None:
    """(which bound, its value, the valid range) of a bound beyond `n` items, else None. Stepping
    backwards, stop -n-1 reaches index 0 (`[2:-7:-1]` on 6 items)."""
    back = s.step is not None and s.step < 0
    for which, value, low, high in (("start", s.start, -n, n - 1 if back else n),
                                    ("stop", s.stop, -n - 1 if back else -n, n - 1 if back else n)):
        if value is not None and not low <= value <= high:
            return which, value, f"{low}..{high}"
    return None


def _slice_text(s: Slice) -> str:
    text = f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
    return text + (f":{s.step}" if s.step is not None else "")


def _unique(scopes: Iterable[_Scope]) -> list[_Scope]:
    return list(dict.fromkeys(scopes))


def _dedupe(results: Iterable[Target | Block]) -> list[Target | Block]:
    return list({(type(r).__name__, r.path): r for r in results}.values())
