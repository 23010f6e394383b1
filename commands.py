"""The `slimfx` subcommands that need a model: plan, compile, train, eval. Torch is imported only
when one of them runs, so `slimfx check` stays fast."""
from __future__ import annotations

import os
import sys

from .dsl.errors import SpecError

__all__ = ["add_model_commands"]

MODEL_HELP = "smollm2-135m, minilm-l6, tiny:<arch>, or a local Hugging Face model directory"


def add_model_commands(sub) -> None:
    plan = sub.add_parser("plan", help="show what a policy would do to a model, touching nothing")
    plan.add_argument("spec", help="policy file (`-` for standard input)")
    plan.add_argument("--model", required=True, help=MODEL_HELP)
    plan.add_argument("--policy", help="which policy of the file (when it holds several)")
    plan.set_defaults(run=_guarded(_plan))

    comp = sub.add_parser("compile", help="compile a model with a policy and save the artifact")
    comp.add_argument("spec", help="policy file (`-` for standard input)")
    comp.add_argument("--model", required=True, help=MODEL_HELP)
    comp.add_argument("--policy", help="which policy of the file (when it holds several)")
    comp.add_argument("--out", required=True, help="artifact directory to write")
    calib = comp.add_mutually_exclusive_group()
    calib.add_argument("--calib", metavar="FILE", help="calibration text (UTF-8; paragraphs become calibration "
                       "texts, in rows of at most 128 tokens, none dropped); default: 3,072 tokens of the part "
                       "of the built-in text that `slimfx eval` never scores")
    calib.add_argument("--calib-tokens", metavar="N", type=int, help="calibrate on N tokens of built-in text "
                       "(the default's 3,072, then standard-library docstrings `slimfx eval` never scores and the "
                       "Language Reference's topics): `heal method=linear` fits better on 25000, the LoRA heal "
                       "of 8 removed blocks best on all of it (README, collapse section)")
    comp.add_argument("--stats", action="store_true", help="also print the code generator's fusion groups and "
                      "their memory traffic (unfused vs fused) for one run on the model's example inputs")
    comp.add_argument("--emit-kernels", metavar="DIR", help="also write the Triton source of every kernel the "
                      "Triton backend generates for this model (a header names the graph nodes each replaces; "
                      "DIR/index.txt lists them and the groups left to eager ops)")
    comp.set_defaults(run=_guarded(_compile))

    tr = sub.add_parser("train", help="train a compiled model's adapters (LoRA/DoRA, QLoRA) and save it")
    tr.add_argument("--model", required=True, help=MODEL_HELP + " (the model that was compiled)")
    tr.add_argument("--compiled", required=True, help="artifact directory from `slimfx compile`, with adapters")
    tr.add_argument("--steps", type=int, required=True, help="optimizer steps (AdamW over the adapters)")
    tr.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    tr.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                    help="lr schedule: constant (default), or cosine (warm-up over the first 5%% of the steps, "
                    "then decay towards 0)")
    tr.add_argument("--batch", type=int, default=4, help="rows of the training batch (default 4)")
    tr.add_argument("--seq", type=int, default=128, help="tokens per row (default 128)")
    tr.add_argument("--loss", choices=("lm", "distill"), help="lm: next-token cross entropy; distill: match the "
                    "original model's outputs; default: lm for causal LMs, distill otherwise")
    tr.add_argument("--seed", type=int, default=0, help="seed of the adapters' dropout (default 0: runs repeat)")
    tr.add_argument("--out", help="artifact directory to write (default: <compiled>-trained)")
    tr.set_defaults(run=_guarded(_train))

    ev = sub.add_parser("eval", help="perplexity (causal LMs) or embedding cosine (encoders), bytes, latency")
    ev.add_argument("--model", required=True, help=MODEL_HELP)
    ev.add_argument("--compiled", help="artifact directory from `slimfx compile`, evaluated side by side")
    ev.add_argument("--max-tokens", type=int, default=2048, help="tokens of the default text to score")
    ev.set_defaults(run=_guarded(_eval))


TRACEBACK_ENV = "SLIMFX_TRACEBACK"


class UsageError(ValueError):
    """A command-line argument that cannot work (an --out that is a file, an unreadable --calib)."""


def _guarded(fn):
    """Policy, model, artifact and argument problems print as messages, not tracebacks."""

    def run(args) -> int:
        from .evaluation import NotScorable
        from .models import ModelNotFound
        from .runtime.artifact_errors import ArtifactError

        try:
            return fn(args)
        except SpecError as e:
            print(str(e), file=sys.stderr)
        except (ModelNotFound, ArtifactError, UsageError, NotScorable) as e:
            print(f"error: {e}", file=sys.stderr)
        except Exception as e:  # anything else still prints as one message; the traceback on request
            if os.environ.get(TRACEBACK_ENV) == "1":
                raise
            print(f"error: {type(e).__name__}: {e}\n(set {TRACEBACK_ENV}=1 to see where it was raised; if the "
                  "input looks right, that traceback is a slimfx bug to report)", file=sys.stderr)
        return 1

    return run


def _console():
    """Tables fit the terminal; piped into a file or a log they are not squeezed to 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _load_model(name: str):
    from .models import load

    return load(name, announce=lambda: print(f"loading {name} …", file=sys.stderr))


def _plan(args) -> int:
    from . import api
    from .plan_table import plan_table

    spec = _spec(args.spec, args.policy)
    loaded = _load_model(args.model)
    plan = api.plan(loaded, spec, name=args.policy)
    _console().print(plan_table(plan, "<stdin>" if args.spec == "-" else args.spec))
    return 0


def _compile(args) -> int:
    from . import api

    _check_out(args.out)  # before minutes of compiling, not after
    spec = _spec(args.spec, args.policy)
    if args.emit_kernels:
        _check_apart(args.out, args.emit_kernels)
        _check_listing_folder(args.emit_kernels)
    calib = _read_calib(args.calib) if args.calib else None
    loaded = _load_model(args.model)
    if (calib is not None or args.calib_tokens is not None) and loaded.tokenizer is None:
        option = "--calib" if calib is not None else "--calib-tokens"
        raise UsageError(f"{option} calibrates on text, and {args.model} has no tokenizer to read it with; "
                         "calibrate from Python with compile(..., calib=[batch, ...]) of the model's own inputs")
    if args.calib_tokens is not None:
        calib = _builtin_calib(loaded, args.calib_tokens)
    cm = api.compile(loaded, spec, name=args.policy, calib=calib, progress=True)
    _console().print(cm.report.table())
    if args.stats:
        print(_group_stats(cm, loaded))
    cm.save(args.out)  # first: the compile is kept whatever happens to the listings
    print(f"saved to {args.out}", file=sys.stderr)
    if args.emit_kernels:
        print(_emit_kernels(cm, args.emit_kernels), file=sys.stderr)
    return 0


def _spec(name: str, policy: str | None):
    """The policy file (for `-`, standard input: errors name `<stdin>`) parsed and checked, and
    the --policy it names found, before the model loads: a typo costs no loading."""
    from . import api
    from .dsl import parse

    _, spec = api.resolve_policy(parse(sys.stdin.buffer.read(), filename="<stdin>") if name == "-" else name, policy)
    return spec


def _group_stats(cm, loaded) -> str:
    from .codegen.stats import stats
    from .runtime.inputs import complete_inputs
    from .runtime.lower import unlowered

    bound = complete_inputs(dict(loaded.example_inputs), cm.graph.inputs)
    with unlowered(cm.program):  # the groups are those of the reference graph the generator reads
        return stats(cm.program, [bound[n] for n in cm.input_names]).render()


def _emit_kernels(cm, folder: str) -> str:
    from .codegen.listing import write_kernels
    from .runtime.lower import unlowered

    with unlowered(cm.program):
        summary = write_kernels(cm.program.graph, folder)
    return f"kernels written to {folder}: {summary}"


def _check_out(out: str) -> None:
    from pathlib import Path

    from .runtime.artifact import check_target

    check_target(Path(out))  # a file, a file above it, a foreign non-empty folder
    _check_writable("--out", out)


def _check_apart(out: str, listing: str) -> None:
    """--out and --emit-kernels in one folder, or one inside the other: each replaces or empties
    its folder, so the second would fail after the compile (or delete the first)."""
    from pathlib import Path

    a, b = Path(out).resolve(), Path(listing).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UsageError(f"--out {out} and --emit-kernels {listing} overlap; write them to separate folders, "
                         f"e.g. --emit-kernels {out.rstrip('/')}-kernels (beside --out)")


def _check_listing_folder(path: str) -> None:
    """--emit-kernels: a new or empty folder, or one an earlier listing wrote (codegen/listing.py)."""
    from pathlib import Path

    from .codegen.listing import INDEX

    _check_folder("--emit-kernels", path)
    folder = Path(path)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / INDEX).is_file():
        raise UsageError(f"--emit-kernels {path} is a non-empty folder that no kernel listing wrote; "
                         "choose a new or empty one")


def _check_folder(option: str, path: str) -> None:
    """A directory `option` is to write: not a file, under directories only, in a writable place."""
    from pathlib import Path

    if Path(path).is_file():
        raise UsageError(f"{option} {path} is a file; pass a directory path")
    above = next(p for p in Path(path).absolute().parents if p.exists())
    if not above.is_dir():
        raise UsageError(f"cannot write {option} {path}: {above} is a file, not a directory")
    _check_writable(option, path)


def _check_writable(option: str, path: str) -> None:
    """The nearest existing directory above `path` can be written (mkdir there must work)."""
    from pathlib import Path

    above = next(p for p in Path(path).absolute().parents if p.exists())
    if not os.access(above, os.W_OK):
        raise UsageError(f"cannot write {option} {path}: {above} is not writable")


def _read_calib(path: str) -> list[str]:
    from .calibration import read_paragraphs

    try:
        return read_paragraphs(path)
    except ValueError as e:
        raise UsageError(f"--calib: {e}") from None


def _builtin_calib(loaded, tokens: int) -> list[dict]:
    from .calibration import calibration_batches

    try:
        return calibration_batches(loaded, tokens)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--calib-tokens: {e}") from None


def _train(args) -> int:
    import torch

    from . import api
    from .runtime.train import NothingToDistil, train

    _check_train_args(args)
    out = args.out or f"{args.compiled.rstrip('/')}-trained"
    _check_out(out)  # before loading and training, not after
    cm = api.load(args.compiled)
    if not cm.adapter_parameters():
        merged = [r for r in cm.report.rules if r.details.get("merged")]
        if merged:  # "compile it with an `adapt` rule" told them to do what they had done
            raise UsageError(f"{args.compiled} has no adapters to train: line {merged[0].line}'s `{merged[0].kind}` "
                             "merged them into the weights at compile; compile with merge=false on it to train them")
        raise UsageError(f"{args.compiled} has no adapters to train: compile it with an `adapt` rule, "
                         "e.g. `adapt blocks.*.attn.{q,v} lora rank=16 alpha=32`")
    tokens = [r for r in cm.report.rules if r.kind == "tokens"]
    if tokens:  # train() refuses them too, but as a ValueError the CLI would print as a slimfx bug
        raise UsageError(f"{args.compiled} was compiled with token rules (line {tokens[0].line}), whose ops have no "
                         "gradients: compile the policy without them, train that, and put the token rules in a "
                         "second compile of the result (Python: slimfx.compile(cm.merge_adapters(), \"tokens unpad\"))")
    loaded = _load_model(args.model)
    _check_same_model(cm, loaded, args)
    loss = args.loss or ("lm" if loaded.kind == "causal-lm" else "distill")
    if loss == "lm" and loaded.kind != "causal-lm":
        raise UsageError(f"--loss lm is next-token cross entropy, and {args.model} is not a causal LM (it is "
                         f"{loaded.kind}); use --loss distill (match the original model's outputs)")
    if loss == "lm" and args.seq < 2:
        raise UsageError(f"--seq {args.seq} leaves no next token to predict: the lm loss needs --seq 2 or more")
    _check_text_inputs(cm, args, "train")
    batches = [{k: v for k, v in b.items() if k in cm.input_names}  # a graph captured from bare ids takes no mask
               for b in _training_batches(loaded, args.batch, args.seq, args.steps)]
    cycled = f", {args.steps / len(batches):.1f} passes over them" if len(batches) < args.steps else ""
    print(f"training {len(cm.adapters)} adapters ({_count_params(cm)} parameters) for {_counted(args.steps, 'step')} "
          f"on {_counted(len(batches), 'batch')} of {args.batch}×{args.seq} tokens of calibration text{cycled}, {loss} loss, "
          f"lr {args.lr:g}" + (" with a cosine schedule" if args.schedule == "cosine" else ""), file=sys.stderr)
    torch.manual_seed(args.seed)
    try:
        result = train(cm, batches, steps=args.steps, lr=args.lr, loss=loss, schedule=args.schedule,
                       teacher=loaded.model if loss == "distill" else None, progress=True)
    except NothingToDistil:
        lm_too = ", or train with --loss lm" if loaded.kind == "causal-lm" else ""
        raise UsageError(f"{args.compiled} computes what {args.model} does (distill loss 0 on the first batch): its "
                         "adapters start at zero and no other rule changed the model, so there is nothing to distil; "
                         f"compile a policy that also changes the model (quantize, drop/collapse){lm_too}") from None
    for i, value in enumerate(result.losses, 1):  # .4g: a distill loss of 2e-5 is not "0.0000"
        print(f"step {i:>{len(str(args.steps))}}/{args.steps}  loss {value:.4g}")
    print(f"loss {result.first:.4g} -> {result.last:.4g} in {result.seconds:.1f}s")
    cm.save(out)
    print(f"saved to {out}", file=sys.stderr)
    return 0


def _check_same_model(cm, loaded, args) -> None:
    """--model must be the model --compiled was compiled from: another one would be scored or
    distilled against as if it were the original. The artifact records the class, and the name,
    shape and dtype of every tensor it kept; the tensors both have under one name and dtype must
    agree in shape (quantized, low-rank and removed ones are not compared)."""
    mine = type(loaded.model).__name__
    if cm.graph.model_class != mine:
        raise UsageError(f"{args.compiled} was compiled from a {cm.graph.model_class}, --model {args.model} is a "
                         f"{mine}; pass the model it was compiled from")
    _check_same_modules(cm, loaded, args)
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


def _check_same_modules(cm, loaded, args) -> None:
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
    removed = [p for r in cm.report.rules if r.kind in ("drop", "collapse") for p in r.targets]
    extra = [p for p in mine if p not in cm.graph.modules
             and not any(p == r or p.startswith(r + ".") for r in removed)]
    if extra:
        raise UsageError(f"{args.compiled} was compiled from another {cm.graph.model_class}: --model {args.model} "
                         f"has {extra[0]}, which the artifact neither has nor removed; pass the model it was "
                         "compiled from")


def _check_text_inputs(cm, args, command: str) -> None:
    """eval and train call the model with token ids and what a tokenizer gives with them (a mask, token
    types), which a graph fills in when it was captured without them; an input beyond those (a
    graph captured with `labels`) has nothing to come from."""
    from .runtime.inputs import FILLABLE

    other = [n for n in cm.input_names if n != "input_ids" and n not in FILLABLE]
    if other:
        raise UsageError(f"{args.compiled} was compiled with the inputs {list(cm.input_names)}; slimfx {command} gives "
                         f"token ids and a mask, nothing for {other}: compile it with the model's own example "
                         "inputs (as `slimfx compile --model` does), without " + ", ".join(other))


def _check_train_args(args) -> None:
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.lr < float("inf"):
        raise UsageError(f"--lr must be a positive finite number, got {args.lr}")


def _training_batches(loaded, batch: int, seq: int, steps: int) -> list[dict]:
    """One batch×seq batch per step, each the next tokens of the calibration text (the part `slimfx
    eval` never scores; then standard-library docstrings, which it never scores either, when the
    steps need more), packed into rows with no padding; when even that runs out, train() goes
    round the batches again. One fixed batch for every step would fit that batch, not the text."""
    import torch

    from .evaluation import calibration_texts, context_length
    from .more_text import more_texts

    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.name} has no tokenizer; `slimfx train` trains on text "
                         "(use slimfx.train() from Python with your own batches)")
    limit = context_length(loaded.model)
    if limit is not None and seq > limit:  # an index error deep in the position embedding otherwise
        raise UsageError(f"--seq {seq} is longer than {loaded.name} takes ({limit} positions); "
                         f"use --seq {limit} or less")
    size = batch * seq
    ids = _token_ids(loaded, calibration_texts())
    if ids.numel() < size * steps:
        ids = _token_ids(loaded, [*calibration_texts(), *more_texts()])
    if ids.numel() < size:
        raise UsageError(f"--batch {batch} × --seq {seq} needs {size} tokens; the calibration "
                         f"text has {ids.numel()}")
    count = min(steps, ids.numel() // size)
    rows = ids[:count * size].reshape(count, batch, seq)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]


def _token_ids(loaded, texts: list[str]):
    import torch

    return torch.as_tensor(loaded.tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"]).reshape(-1)


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


def _count_params(cm) -> str:
    n = sum(p.numel() for p in cm.adapter_parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _eval(args) -> int:
    from .evaluation import eval_table

    if args.max_tokens < 2:  # the first token has nothing before it to be predicted from
        raise UsageError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    loaded = _load_model(args.model)
    compiled = None
    if args.compiled:
        from . import api

        compiled = api.load(args.compiled)
        _check_same_model(compiled, loaded, args)
        _check_text_inputs(compiled, args, "eval")
    _console().print(eval_table(loaded, compiled, max_tokens=args.max_tokens))
    return 0
