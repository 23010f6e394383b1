"""The `slimfx` commands' checks of their arguments, made before a model loads or a compile
starts: an --out that cannot be written, folders that overlap, a --model that is not the one an
artifact was compiled from, training options that cannot work. Each failure is a UsageError, which
the command prints as a message."""
from __future__ import annotations

import os
import tempfile

__all__ = ["UsageError", "check_out", "check_apart", "check_listing_folder", "check_not_nested", "check_same_model",
           "check_text_inputs", "check_train_args", "load_compiled", "non_empty"]


class UsageError(ValueError):
    """A command-line argument that cannot work (an --out that is a file, an unreadable --calib)."""


def non_empty(value: str) -> str:
    """argparse's type for a path or name: an empty one (`--compiled "$ART"` with ART unset) was
    taken as not given — eval scored the original alone and exited 0, train wrote to the default."""
    if not value:
        import argparse

        raise argparse.ArgumentTypeError("is empty (an unset shell variable?): pass a path or name")
    return value


def load_compiled(compiled: str, model: str):
    """The artifact at --compiled; where that is a Hugging Face model folder (config.json, no
    meta.json), the refusal says the two arguments look swapped."""
    from pathlib import Path

    from . import api
    from .runtime.artifact_errors import ArtifactError

    try:
        return api.load(compiled)
    except ArtifactError as e:
        folder = Path(compiled)
        if (folder / "config.json").is_file() and not (folder / "meta.json").exists():
            swapped = (f" and --model {model} is one: swap the two" if (Path(model) / "meta.json").is_file() else
                       ": pass it as --model, and as --compiled the directory `slimfx compile --out` wrote")
            raise UsageError(f"{e}\n--compiled {compiled} holds a Hugging Face model (config.json), not a slimfx "
                             f"artifact{swapped}") from None
        raise


def check_out(out: str) -> None:
    from pathlib import Path

    from .runtime.artifact import check_target

    check_target(Path(out))  # a file, a file above it, a foreign non-empty folder, a link loop
    check_writable("--out", str(_resolved("--out", out)))  # a link is saved through: where it points


def check_apart(out: str, listing: str) -> None:
    """--out and --emit-kernels in one folder, or one inside the other: each replaces or empties
    its folder, so the second would fail after the compile (or delete the first)."""
    a, b = _resolved("--out", out), _resolved("--emit-kernels", listing)
    if a == b or a in b.parents or b in a.parents:
        raise UsageError(f"--out {out} and --emit-kernels {listing} overlap; write them to separate folders, "
                         f"e.g. --emit-kernels {out.rstrip('/')}-kernels (beside --out)")


def check_not_nested(out: str, compiled: str) -> None:
    """train's --out inside --compiled (or around it): an artifact inside another, which that one's
    next save then refused ("besides an artifact's files it holds trained/"). The same folder is
    fine: the artifact is trained in place."""
    a, b = _resolved("--out", out), _resolved("--compiled", compiled)
    if a != b and (a in b.parents or b in a.parents):
        where = "inside" if b in a.parents else "around"
        raise UsageError(f"--out {out} is {where} --compiled {compiled}: one artifact would hold the other; "
                         f"write it beside it, e.g. --out {compiled.rstrip('/')}-trained (the default)")


def check_listing_folder(path: str) -> None:
    """--emit-kernels: a new or empty folder, or one an earlier listing wrote (codegen/listing.py)."""
    from pathlib import Path

    from .codegen.listing import INDEX

    check_folder("--emit-kernels", path)
    folder = Path(path)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / INDEX).is_file():
        raise UsageError(f"--emit-kernels {path} is a non-empty folder that no kernel listing wrote; "
                         "choose a new or empty one")


def check_folder(option: str, path: str) -> None:
    """A directory `option` is to write: not a file, under directories only, in a writable place."""
    from pathlib import Path

    from .runtime.artifact_files import nearest_existing, not_a_directory

    if (problem := not_a_directory(Path(path))) is not None:
        raise UsageError(f"{option} {path}: {problem}")
    _resolved(option, path)
    above = nearest_existing(Path(path))
    if not above.is_dir():
        raise UsageError(f"cannot write {option} {path}: {above} is a file, not a directory")
    check_writable(option, path)


def check_writable(option: str, path: str) -> None:
    """The nearest existing directory above `path` can be written (mkdir there must work), or
    `path` itself where it is a directory already (a save fills it in place when its parent is
    not writable: runtime/atomic_dir.py)."""
    from pathlib import Path

    from .runtime.artifact_files import nearest_existing

    above = Path(path) if Path(path).is_dir() else nearest_existing(Path(path))
    if not os.access(above, os.W_OK):
        raise UsageError(f"cannot write {option} {path}: {above} is not writable")
    # access() answers yes to root everywhere, and for places no one can make a folder in (/proc,
    # some network mounts): the save failed there after the whole compile. A folder made and
    # removed says it before any work.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".slimfx-probe-", dir=above))
    except OSError as e:
        raise UsageError(f"cannot write {option} {path}: a folder cannot be made in {above} "
                         f"({e.strerror or e}); choose a place this user can write") from None


def _resolved(option: str, path: str):
    """`path` with its links followed; a UsageError where they loop."""
    from pathlib import Path

    from .runtime.artifact_files import LOOP, resolved_or_none

    real = resolved_or_none(Path(path))
    if real is None:
        raise UsageError(f"cannot write {option} {path}: {LOOP}")
    return real


def check_same_model(cm, loaded, args) -> None:
    """--model must be the model --compiled was compiled from: another one would be scored or
    distilled against as if it were the original. The artifact records the class, and the name,
    shape and dtype of every tensor it kept; the tensors both have under one name and dtype must
    agree in shape (quantized, low-rank and removed ones are not compared)."""
    mine = type(loaded.model).__name__
    if cm.graph.model_class != mine:
        raise UsageError(f"{args.compiled} was compiled from a {cm.graph.model_class}, --model {args.model} is a "
                         f"{mine}; pass the model it was compiled from")
    check_same_modules(cm, loaded, args)
    kept = {p.name: p for info in cm.graph.modules.values() for p in info.params}
    common = [(name, tuple(t.shape), tuple(p.shape)) for name, t in loaded.model.state_dict().items()
              if (p := kept.get(name)) is not None and p.dtype == str(t.dtype).removeprefix("torch.")]
    if not common:
        raise UsageError(f"{args.compiled} shares no tensor with --model {args.model} (no name with the same "
                         "dtype): it was compiled from another model; pass the model it was compiled from")
    for name, shape, was in common:
        if shape != was:
            raise UsageError(f"{args.compiled} was compiled from another {mine}: its {name} is {list(was)}, "
                             f"--model {args.model}'s is {list(shape)}; pass the model it was compiled from")


def check_same_modules(cm, loaded, args) -> None:
    """The artifact's module table is the compiled model's, less the blocks its `drop`/`collapse`
    rules removed: a module it has that --model lacks, or one --model has outside what was removed,
    is another model (a 3-block artifact was scored against a 2-block model, as ×0.577 bytes)."""
    mine = dict(loaded.model.named_modules())
    for path, info in cm.graph.modules.items():
        if path not in mine or type(mine[path]).__name__ != info.cls:
            has = "lacks it" if path not in mine else f"has a {type(mine[path]).__name__} there"
            raise UsageError(f"{args.compiled} was compiled from another {cm.graph.model_class}: it has "
                             f"{path or 'the root'} ({info.cls}), --model {args.model} {has}; pass the model it "
                             "was compiled from")
    # every compile's removals: one of an earlier compile (`compile(cm, …)`) too
    reports = (*cm.report.earlier, cm.report)
    removed = [p for rep in reports for r in rep.rules if r.kind in ("drop", "collapse") for p in r.targets]
    missing = next((p for p in removed if p not in mine), None)
    if missing is not None:  # a smaller model passed the check above, as ×1.000 bytes of the artifact
        raise UsageError(f"{args.compiled} was compiled from another {cm.graph.model_class}: it removed {missing}, "
                         f"which --model {args.model} lacks; pass the model it was compiled from")
    extra = [p for p in mine if p not in cm.graph.modules
             and not any(p == r or p.startswith(r + ".") for r in removed)]
    if extra:
        raise UsageError(f"{args.compiled} was compiled from another {cm.graph.model_class}: --model {args.model} "
                         f"has {extra[0]}, which the artifact neither has nor removed; pass the model it was "
                         "compiled from")


def check_text_inputs(cm, args, command: str) -> None:
    """eval and train call the model with token ids and what a tokenizer gives with them (a mask, token
    types), which a graph fills in when it was captured without them; an input beyond those (a
    graph captured with `labels`) has nothing to come from."""
    from .runtime.inputs import FILLABLE

    other = [n for n in cm.input_names if n != "input_ids" and n not in FILLABLE]
    if other:
        raise UsageError(f"{args.compiled} was compiled with the inputs {list(cm.input_names)}; slimfx {command} gives "
                         f"token ids and a mask, nothing for {other}: compile it with the model's own example "
                         "inputs (as `slimfx compile --model` does), without " + ", ".join(other))


def check_train_args(args) -> None:
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.lr < float("inf"):
        raise UsageError(f"--lr must be a positive finite number, got {args.lr}")
    # torch.manual_seed takes 64 bits, signed or not; beyond, it failed after the model had loaded
    if not -2**63 <= args.seed < 2**64:
        raise UsageError(f"--seed must be a whole number from -2^63 to 2^64-1, got {args.seed}")
