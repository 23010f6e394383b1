"""The `slimfx` subcommands that need a model: plan, compile, train, eval. Torch is imported only
when one of them runs, so `slimfx check` stays fast."""
from __future__ import annotations

import errno
import os
import sys

from .command_checks import (UsageError, check_apart, check_listing_folder, check_not_nested, check_out,
                             check_same_model, check_text_inputs, check_train_args, load_compiled, non_empty)
from .dsl.errors import SpecError

__all__ = ["add_model_commands"]

EVAL_TOKENS = 2048
MODEL_HELP = "smollm2-135m, minilm-l6, tiny:<arch>, or a local Hugging Face model directory"


def add_model_commands(sub) -> None:
    plan = sub.add_parser("plan", help="show what a policy would do to a model, touching nothing")
    plan.add_argument("spec", type=non_empty, help="policy file (`-` for standard input)")
    plan.add_argument("--model", required=True, type=non_empty, help=MODEL_HELP)
    plan.add_argument("--policy", type=non_empty, help="which policy of the file (when it holds several)")
    plan.set_defaults(run=_guarded(_plan))

    comp = sub.add_parser("compile", help="compile a model with a policy and save the artifact")
    comp.add_argument("spec", type=non_empty, help="policy file (`-` for standard input)")
    comp.add_argument("--model", required=True, type=non_empty, help=MODEL_HELP)
    comp.add_argument("--policy", type=non_empty, help="which policy of the file (when it holds several)")
    comp.add_argument("--out", required=True, type=non_empty, help="artifact directory to write")
    calib = comp.add_mutually_exclusive_group()
    calib.add_argument("--calib", metavar="FILE", type=non_empty, help="calibration text (UTF-8; paragraphs become calibration "
                       "texts, in rows of at most 128 tokens, none dropped); default: 3,072 tokens of the part "
                       "of the built-in text that `slimfx eval` never scores")
    calib.add_argument("--calib-tokens", metavar="N", type=int, help="calibrate on N tokens of built-in text "
                       "(the default's 3,072, then standard-library docstrings `slimfx eval` never scores and the "
                       "Language Reference's topics): `heal method=linear` fits better on 25000, the LoRA heal "
                       "of 8 removed blocks best on all of it (benchmarks/README.md, collapse section)")
    comp.add_argument("--stats", action="store_true", help="also print the code generator's fusion groups and "
                      "their memory traffic (unfused vs fused) for one run on the model's example inputs")
    comp.add_argument("--emit-kernels", metavar="DIR", type=non_empty, help="also write the Triton source of every kernel the "
                      "Triton backend generates for this model (a header names the graph nodes each replaces; "
                      "DIR/index.txt lists them and the groups left to eager ops)")
    comp.set_defaults(run=_guarded(_compile))

    tr = sub.add_parser("train", help="train a compiled model's adapters (LoRA/DoRA, QLoRA) and save it")
    tr.add_argument("--model", required=True, type=non_empty, help=MODEL_HELP + " (the model that was compiled)")
    tr.add_argument("--compiled", required=True, type=non_empty, help="artifact directory from `slimfx compile`, with adapters")
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
    tr.add_argument("--out", type=non_empty, help="artifact directory to write (default: <compiled>-trained)")
    tr.set_defaults(run=_guarded(_train))

    ev = sub.add_parser("eval", help="perplexity (causal LMs), embedding cosine (encoders) or logit cosine "
                                     "(vision), bytes, latency")
    ev.add_argument("--model", required=True, type=non_empty, help=MODEL_HELP)
    ev.add_argument("--compiled", type=non_empty, help="artifact directory from `slimfx compile`, evaluated side by side")
    ev.add_argument("--max-tokens", type=int, help="causal LMs: score the first N tokens of the eval text "
                    f"(default {EVAL_TOKENS}; all of it when N is larger, which it then says)")
    ev.set_defaults(run=_guarded(_eval))


TRACEBACK_ENV = "SLIMFX_TRACEBACK"


def _guarded(fn):
    """Policy, model, artifact and argument problems print as messages, not tracebacks."""

    def run(args) -> int:
        from .evaluation import NotScorable
        from .models import ModelNotFound
        from .runtime.artifact_errors import ArtifactError
        from .runtime.artifact_files import PLACE_ERRORS  # a full disk: the machine's state, not a bug
        from .runtime.train import Diverged  # a loss that is not finite

        try:
            return fn(args)
        except SpecError as e:
            print(str(e), file=sys.stderr)
        except (ModelNotFound, ArtifactError, UsageError, NotScorable, Diverged) as e:
            print(f"error: {e}", file=sys.stderr)
        except BrokenPipeError:  # `slimfx … | head`: cli.main ends quietly; whatever was saved stays
            raise
        except OSError as e:
            if e.errno not in PLACE_ERRORS:
                return _bug(e)
            where = f"{e.filename}: " if e.filename else ""
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                print(f"error: {where}{e.strerror}; what was being written is not kept (a save is whole "
                      "or nothing): free some space, or choose another place, and run it again", file=sys.stderr)
            else:
                print(f"error: {where}{e.strerror}; choose a place this user can use", file=sys.stderr)
        except Exception as e:  # anything else still prints as one message; the traceback on request
            return _bug(e)
        return 1

    return run


def _bug(e: Exception) -> int:
    if os.environ.get(TRACEBACK_ENV) == "1":
        raise e
    print(f"error: {type(e).__name__}: {e}\n(set {TRACEBACK_ENV}=1 to see where it was raised; if the "
          "input looks right, that traceback is a slimfx bug to report)", file=sys.stderr)
    return 1


def _console():
    """Tables fit the terminal; piped into a file or a log they are not squeezed to 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else _Piped(Console(width=200))


class _Piped:
    """A 200-column console whose lines lose the padding rich gives them (a centred title or
    caption ran on in spaces to column 200 in every log)."""

    def __init__(self, console):
        self.console = console

    def print(self, *objects) -> None:
        with self.console.capture() as captured:
            self.console.print(*objects)
        sys.stdout.write("\n".join(line.rstrip() for line in captured.get().split("\n")))


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

    check_out(args.out)  # before minutes of compiling, not after
    if args.calib_tokens is not None:
        _check_calib_tokens(args.calib_tokens)  # and before the model loads
    spec = _spec(args.spec, args.policy)
    if args.emit_kernels:
        check_apart(args.out, args.emit_kernels)
        check_listing_folder(args.emit_kernels)
    calib = _read_calib(args.calib) if args.calib else None
    loaded = _load_model(args.model)
    if (calib is not None or args.calib_tokens is not None) and loaded.tokenizer is None:
        option = "--calib" if calib is not None else "--calib-tokens"
        raise UsageError(f"{option} calibrates on text, and {args.model} has no tokenizer to read it with; "
                         "calibrate from Python with compile(..., calib=[batch, ...]) of the model's own inputs")
    if args.calib_tokens is not None:
        calib = _builtin_calib(loaded, args.calib_tokens)
    cm = api.compile(loaded, spec, name=args.policy, calib=calib, progress=True)
    cm.save(args.out)  # first: the compile is kept whatever happens to what is printed (`| head`)
    listing = _emit_kernels(cm, args.emit_kernels) if args.emit_kernels else None
    if (args.calib or args.calib_tokens is not None) and not cm.report.calibration:
        print(f"note: {'--calib' if args.calib else '--calib-tokens'} was not used: no rule of this policy "
              "calibrates (round-to-nearest quantization, adapters and token rules need none)", file=sys.stderr)
    _console().print(cm.report.table())
    if args.stats:
        print(_group_stats(cm, loaded))
    print(f"saved to {args.out}", file=sys.stderr)
    if listing:
        print(listing, file=sys.stderr)
    return 0


def _spec(name: str, policy: str | None):
    """The policy file (for `-`, standard input: errors name `<stdin>`) parsed and checked, and
    the --policy it names found, before the model loads: a typo costs no loading."""
    from . import api
    from .dsl import parse

    from pathlib import Path

    # a Path: the argument names a file, always (a name such as `v{2}.slim` was read as policy text)
    source = parse(sys.stdin.buffer.read(), filename="<stdin>") if name == "-" else Path(name)
    chosen, spec = api.resolve_policy(source, policy, choose="pass --policy NAME to choose one")
    if not spec.policies:  # the model would be compiled (or planned) unchanged, and exit 0 say it worked
        raise UsageError(f"{spec.filename} holds no policy (it is empty or only comments): write one, e.g. "
                         "`policy small { quantize blocks.*.** : Linear int8 }` (`slimfx check` validates it)")
    if not chosen.rules:  # the same, for `policy p {}`
        raise UsageError(f"policy `{chosen.name}` in {spec.filename} has no rules, so it would leave the model "
                         "unchanged: add one, e.g. `quantize blocks.*.** : Linear int8`")
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


def _read_calib(path: str) -> list[str]:
    from .calibration import read_paragraphs

    try:
        return read_paragraphs(path)
    except ValueError as e:
        raise UsageError(f"--calib: {e}") from None


def _check_calib_tokens(tokens: int) -> None:
    """What the count alone says is wrong (the model's text says how many it has, once loaded)."""
    from .calibration import MAX_TOKENS

    if tokens < MAX_TOKENS:
        raise UsageError(f"--calib-tokens {tokens}: ask for at least {MAX_TOKENS} tokens (one calibration row), "
                         "e.g. --calib-tokens 25000")


def _builtin_calib(loaded, tokens: int) -> list[dict]:
    from .calibration import CalibrationSize, calibration_batches

    try:
        return calibration_batches(loaded, tokens)
    except CalibrationSize as e:  # its own words are compile()'s (calib=N, a list of texts)
        raise UsageError(f"--calib-tokens {tokens}: the built-in text has {e.available:,} tokens of {loaded.name}; "
                         f"ask for {e.least} to {e.available:,} (for more, calibrate on your own text with --calib "
                         "FILE)") from None
    except (TypeError, ValueError) as e:
        raise UsageError(f"--calib-tokens: {e}") from None


def _train(args) -> int:
    import torch

    from .runtime.report import counted
    from .runtime.train import NothingToDistil, train

    check_train_args(args)
    out = args.out or _trained_beside(args.compiled)
    check_out(out)  # before loading and training, not after
    check_not_nested(out, args.compiled)
    cm = load_compiled(args.compiled, args.model)
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
    check_same_model(cm, loaded, args)
    loss = args.loss or ("lm" if loaded.kind == "causal-lm" else "distill")
    if loss == "lm" and loaded.kind != "causal-lm":
        raise UsageError(f"--loss lm is next-token cross entropy, and {args.model} is not a causal LM (it is "
                         f"{loaded.kind}); use --loss distill (match the original model's outputs)")
    if loss == "lm" and args.seq < 2:
        raise UsageError(f"--seq {args.seq} leaves no next token to predict: the lm loss needs --seq 2 or more")
    if loaded.tokenizer is None:  # before the inputs' check, whose advice is for text models
        raise UsageError(f"{args.model} has no tokenizer; `slimfx train` trains on text: train it from Python, "
                         "slimfx.train(cm, batches) with batches of the model's own inputs")
    check_text_inputs(cm, args, "train")
    batches, text = _training_batches(loaded, args.batch, args.seq, args.steps)
    batches = [{k: v for k, v in b.items() if k in cm.input_names} for b in batches]  # bare ids: no mask
    cycled = f", {args.steps / len(batches):.1f} passes over them" if len(batches) < args.steps else ""
    print(f"training {len(cm.adapters)} adapters ({_count_params(cm)} parameters) for {counted(args.steps, 'step')} "
          f"on {counted(len(batches), 'batch')} of {args.batch}×{args.seq} tokens of {text}{cycled}, {loss} loss, "
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
    cm.save(out)  # before printing: a closed pipe (`| head`) must not lose the training
    for i, value in enumerate(result.losses, 1):  # .4g: a distill loss of 2e-5 is not "0.0000"
        print(f"step {i:>{len(str(args.steps))}}/{args.steps}  loss {_loss(value)}")
    print(_loss_line(result.first, result.last, result.seconds, args.steps, len(batches)))
    print(f"saved to {out}", file=sys.stderr)
    return 0


def _loss(value: float) -> str:
    """Four significant digits, trailing zeros kept: "3.52" beside "3.718" read as less precise."""
    return f"{value:#.4g}"


def _loss_line(first: float, last: float, seconds: float, steps: int, batches: int) -> str:
    """The loss of the first and last step; which batches they read, lest a pair of different
    batches be read as progress (steps go round the batches: step k reads batch (k - 1) % batches)."""
    same = batches == 1 or (steps - 1) % batches == 0
    each = "" if batches == 1 else " (first and last step on the same batch)" if same else \
        " (first and last step, each on its own batch)"
    return f"loss {_loss(first)} → {_loss(last)}{each} in {seconds:.1f}s"


def _trained_beside(compiled: str) -> str:
    """The default --out of train: DIR-trained beside DIR. For `.` or `..` that is named from the
    directory's own name (`.-trained` was written inside the artifact being trained)."""
    from pathlib import Path

    path = Path(compiled)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    if not path.name:  # the root directory: nothing to name a folder beside it after
        raise UsageError(f"--compiled {compiled} has no name to write the trained artifact beside; pass --out")
    return str(path.with_name(path.name + "-trained"))


_SPILLED = "calibration text, then standard-library docstrings"


def _training_batches(loaded, batch: int, seq: int, steps: int) -> tuple[list[dict], str]:
    """One batch×seq batch per step, each the next tokens of the calibration text (the part `slimfx
    eval` never scores, every paragraph of it, as compile's calibration reads it; then
    standard-library docstrings, which it never scores either, when the steps need more), packed
    into rows with no padding; when even that runs out, train() goes round the batches again. One
    fixed batch for every step would fit that batch, not the text. With the batches, which of
    those texts they hold, for the command to say."""
    import torch

    from .calibration import builtin_text, own_text
    from .evaluation import context_length

    limit = context_length(loaded.model)
    if limit is not None and seq > limit:  # an index error deep in the position embedding otherwise
        raise UsageError(f"--seq {seq} is longer than {loaded.name} takes ({limit} positions); "
                         f"use --seq {limit} or less")
    if loaded.kind != "causal-lm":
        return _encoder_batches(loaded, batch, seq, steps)
    size = batch * seq
    ids = own = _token_ids(loaded, own_text())
    if ids.numel() < size * steps:
        ids = _token_ids(loaded, builtin_text())
    if ids.numel() < size:
        raise UsageError(f"--batch {batch} × --seq {seq} needs {size:,} tokens; the built-in text (calibration "
                         f"text, then standard-library docstrings) has {ids.numel():,}: give a smaller --batch or --seq")
    count = min(steps, ids.numel() // size)
    rows = ids[:count * size].reshape(count, batch, seq)
    text = _SPILLED if count * size > own.numel() else "calibration text"
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows], text


def _encoder_batches(loaded, batch: int, seq: int, steps: int) -> tuple[list[dict], str]:
    """An encoder's batches: rows of at most `seq` tokens, each with its tokenizer's special tokens
    ([CLS] … [SEP]), as it is used and as compile calibrates it (the text packed into rows, as for
    a causal LM, gave one [CLS] in all and no [SEP])."""
    from .calibration import builtin_text, own_text

    tokenizer = loaded.tokenizer
    special = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    if seq <= special:  # the tokenizer then ignores the cut: whole paragraphs, or a failure of its own
        raise UsageError(f"--seq {seq} leaves no room for text: {loaded.name}'s tokenizer adds {special} special "
                         f"tokens to each row; use --seq {special + 1} or more")
    # One text cut into rows, as compile's calibration is: a paragraph a row left headings as rows
    # of a few tokens and the rest padding.
    rows = own = loaded.encode([own_text()], max_length=seq, overflow=True)
    if len(rows["input_ids"]) < batch * steps:
        rows = loaded.encode([builtin_text()], max_length=seq, overflow=True)
    count = min(steps, len(rows["input_ids"]) // batch)
    if count == 0:
        raise UsageError(f"--batch {batch} needs {batch} rows of calibration text; it makes {len(rows['input_ids'])}")
    text = _SPILLED if count * batch > len(own["input_ids"]) else "calibration text"
    return [{k: v[i * batch:(i + 1) * batch] for k, v in rows.items()} for i in range(count)], text


def _token_ids(loaded, text: str):
    import torch

    return torch.as_tensor(loaded.tokenizer(text, return_tensors="pt")["input_ids"]).reshape(-1)


def _count_params(cm) -> str:
    n = sum(p.numel() for p in cm.adapter_parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _eval(args) -> int:
    from .eval_table import eval_table

    if args.max_tokens is not None and args.max_tokens < 2:  # the first token has nothing to be predicted from
        raise UsageError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    compiled = None
    if args.compiled:  # a missing or broken artifact is said before the model loads (seconds for SmolLM2)
        compiled = load_compiled(args.compiled, args.model)
    loaded = _load_model(args.model)
    max_tokens = _eval_tokens(loaded, args.max_tokens)
    if compiled is not None:
        check_same_model(compiled, loaded, args)
        if loaded.tokenizer is not None:  # a vision model is compared on its own example inputs
            check_text_inputs(compiled, args, "eval")
    _console().print(eval_table(loaded, compiled, max_tokens=max_tokens))
    return 0


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _eval_tokens(loaded, asked: int | None) -> int:
    """How many tokens the perplexity scores, said when it is not what --max-tokens asked for."""
    from .evaluation import eval_text

    if loaded.kind != "causal-lm" or loaded.tokenizer is None:
        if asked is not None:
            print(f"note: --max-tokens is not used: it counts the tokens a perplexity scores, and {loaded.name} "
                  f"is {'a causal LM without a tokenizer' if loaded.kind == 'causal-lm' else _a(loaded.kind) + ' model'}",
                  file=sys.stderr)
        return EVAL_TOKENS
    available = _token_ids(loaded, eval_text()).numel()
    wanted = EVAL_TOKENS if asked is None else asked
    if wanted > available:
        print(f"note: the eval text is {available:,} tokens of {loaded.name}; the perplexity reads all of them "
              f"(--max-tokens {wanted:,} asked for more)", file=sys.stderr)
    return min(wanted, available)
