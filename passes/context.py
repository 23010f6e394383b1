"""What every pass may read besides the graph: calibration batches, the policy source (for
errors at the right line), progress bars, where to dump the graph between stages, and the
records one rule leaves for a later one (the cuts a `collapse`/`drop` made, which `heal` repairs;
the weights a precision rule replaced, which `adapt … init=error` starts from)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..runtime.progress import Progress
from ..runtime.report import counted

__all__ = ["Context", "CalibrationBatches", "rule_error"]


class CalibrationBatches(list):
    """`ctx.calib`: a list that notes whether a pass read a batch (len() and truth do not count),
    so the report can say what the model was calibrated on — or that no rule calibrated, and a
    `--calib` the user gave went unused."""

    read = False

    def __init__(self, batches=(), problem: Exception | None = None, ids: str = "input_ids"):
        super().__init__(batches)
        self.ids = ids  # the input holding the token ids (runtime/token_ids.py), for described()
        # Why a batch does not fit the graph (api._calibration binds them as a call): raised when
        # a pass reads them, not at compile's start, so a policy that never calibrates is not
        # refused for calibration it does not use.
        self.problem = problem

    def __iter__(self):
        self._check()
        self.read = True
        return super().__iter__()

    def __getitem__(self, i):
        self._check()
        self.read = True
        return super().__getitem__(i)

    def __add__(self, other):
        return [*self, *other]

    def _check(self) -> None:
        if self.problem is not None:
            raise self.problem

    def unread(self) -> list:
        """The batches for a measurement (a latency, the report's figures on one batch), which
        is not calibrating: the report and `--calib`'s unused note must not count it."""
        self._check()
        return list(super().__iter__())

    def described(self) -> str:
        """"3,072 tokens in 24 rows" (token ids), else "24 rows in 6 batches"."""
        rows = sum(next((v.shape[0] for v in b.values() if getattr(v, "ndim", 0)), 0)
                   for b in super().__iter__())
        if all(self.ids in b for b in super().__iter__()):
            tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b[self.ids].numel()
                         for b in super().__iter__())
            return f"{counted(tokens, 'token')} in {counted(rows, 'row')}"
        return f"{counted(rows, 'row')} in {counted(len(self), 'batch')}"


@dataclass
class Context:
    calib: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    filename: str = "<policy>"
    progress: Progress = field(default_factory=Progress)  # silent unless the caller asked and has a terminal
    dump_dir: str | None = None  # when set, the graph is written here after each stage
    # The model as the user gave it (never modified; called like it), for a pass that compares
    # against the uncompressed model: `heal … distill=true` distills from it.
    reference: Callable[..., Any] | None = None
    # Cuts made by `collapse`/`drop` since the last `heal` (passes/collapse/cut.py's Cut records);
    # a `heal` repairs them and empties the list.
    cuts: list[Any] = field(default_factory=list)
    # Whether a `collapse`/`drop` follows this rule before the next `heal` (the pipeline sets it
    # before each rule): only then does a removal keep what every later block output, for that
    # rule's cuts to be fitted to the model before both (passes/collapse/apply.block_record).
    removals_follow: bool = True
    # Whether a `heal` comes after this rule: without one, nothing reads what the removed blocks
    # output, and recording it was a forward over all the calibration text, reported as calibrating.
    heal_follows: bool = True
    # Linears that carried adapters before any rule ran (compiling a CompiledModel that has some).
    inherited_adapters: frozenset[str] = frozenset()
    # Targets a later `adapt … init=error` names (the pipeline sets it before each rule): a
    # precision rule keeps their float32 [out, in] weights from before it encoded them in
    # `originals` (path -> tensor), and the adapt rule takes them out. Nothing is kept otherwise.
    keep_originals: frozenset[str] = frozenset()
    originals: dict[str, Any] = field(default_factory=dict)
    # When that adapt rule comes right after a precision rule, the pipeline also sets, for its
    # targets, what it will fit (path -> passes/lowrank.py's ErrorPlan): a precision rule that
    # sweeps block by block fits those adapters as it goes, so the blocks after are calibrated on
    # them, and leaves them in `error_fits` (path -> ErrorFit) for the adapt rule to put in.
    error_plans: dict[str, Any] = field(default_factory=dict)
    error_fits: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.calib, CalibrationBatches):
            self.calib = CalibrationBatches(self.calib)


def rule_error(bound, ctx: Context, kind: str, message: str, hint: str | None = None):
    """A SpecError at a bound rule's keyword, in the policy's own text: what a pass raises for bad
    input it finds while running (every pass's refusals read like the checker's)."""
    from ..dsl.errors import SpecError

    return SpecError.at(kind, message, line=bound.line, column=bound.rule.span.column,
                        width=len(bound.rule.kind), hint=hint, source=ctx.source, filename=ctx.filename)
