"""Bind's checks of the `tokens after` steps against each other and against the removals below
them: one step per block, steps in block order; no `drop`/`collapse` that removes a step's block
(compile's removal_problem sees a step only once it is in the graph) or every block after it, and
no auto drop on a model an earlier compile gave a step. Each yields (span, kind, message, hint)
for the binder to report."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from ..dsl import ast as A
from .block_reads import STEP_LEFT_LAST_HINT, auto_drop_problem, step_removed
from .graph import Block

if TYPE_CHECKING:
    from .bind import BoundRule

__all__ = ["steps_left_last", "token_step_order"]

Problem = tuple[A.Span, str, str, str]


def steps_left_last(rules, bound: list["BoundRule"], views, final_view, compiled: str | None,
                    reported: set[int]) -> Iterator[Problem]:
    """A `drop`/`collapse` below a `tokens after` rule that removes the step's block, or every block
    after it: the step ends up after the last block (`tokens after` on the last block is refused).
    `views`: the model as each rule finds it (bind's _views), `final_view` after the last;
    `compiled`: a step an earlier compile made; `reported`: lines already refused."""
    steps: dict[str, BoundRule] = {}  # block path -> the token rule stepping after it, so far
    for i, (rule, b) in enumerate(zip(rules, bound)):
        if isinstance(rule, A.Tokens):
            steps.update({blk.path: b for blk in b.blocks})
        if isinstance(rule, A.Drop) and rule.auto is not None and compiled:  # (one in this policy: dsl/check.py)
            yield (rule.span, "unsupported", *auto_drop_problem(f"the model's `tokens after` step ({compiled})"))
        if not isinstance(rule, A.BLOCK_RULES) or not steps:
            continue  # (after an auto drop too: the stand-in has as many blocks, and this is by position)
        before = views[i][0]
        after = views[i + 1][0] if i + 1 < len(views) else final_view
        if not after.blocks or len(after.blocks) == len(before.blocks):
            continue
        gone = {blk.path for blk in before.blocks} - {blk.path for blk in after.blocks}
        stepped = next((p for p in (blk.path for blk in before.blocks) if p in gone and p in steps), None)
        # the graph has no step yet for removal_problem to see; where it found another reason
        # (T5's first block holds the position bias), moving the drop above the step cannot help
        if stepped is not None and rule.auto is None and rule.span.line not in reported:
            step = steps[stepped]
            yield (rule.selector.span, "unsupported", *step_removed(
                stepped, f"line {step.line}'s `{step.text}` prunes or merges the tokens"))
            continue
        last = after.blocks[-1].path
        if last in steps and last != before.blocks[-1].path:
            yield (rule.selector.span, "out-of-range", f"`{rule.kind}` removes every block after {last}, "
                   f"where line {steps[last].line}'s `{steps[last].text}` prunes or merges tokens: a step "
                   "after the last block saves no work and only changes the output tokens", STEP_LEFT_LAST_HINT)


def token_step_order(steps: list["BoundRule"]) -> Iterator[Problem]:
    """One block given two token steps (the text check sees equal selectors only), or a step
    written below one after a later block."""
    stepped: dict[str, BoundRule] = {}  # block path -> the rule with a merge/prune after it
    deepest: Block | None = None  # the latest block stepped so far (its rule: stepped[path])
    for b in steps:
        clash = next((blk.path for blk in b.blocks if blk.path in stepped), None)
        first = min(b.blocks, key=lambda blk: blk.order)
        if clash is not None:
            earlier = stepped[clash]
            yield (b.rule.selector.span, "duplicate", f"{clash} already has a token step after it from "
                   f"line {earlier.line} (`{earlier.text}`): one merge or prune after each block",
                   "narrow one selector, or give the earlier rule a larger ratio=/keep=")
        elif deepest is not None and first.order < deepest.order:
            # Each step re-indexes the tokens from its block on; one put in above steps already
            # made would read indices that no longer hold (a broken graph, not an error).
            line = stepped[deepest.path].line
            yield (b.rule.selector.span, "illegal-order", f"this token step (after {first.path}) is written "
                   f"below line {line}'s (after {deepest.path}, a later block): `tokens after` rules go "
                   "in block order", f"move this rule above line {line}")
        stepped.update({blk.path: b for blk in b.blocks})
        latest = max(b.blocks, key=lambda blk: blk.order)
        if deepest is None or latest.order > deepest.order:
            deepest = latest
