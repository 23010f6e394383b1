"""compile() / plan() / load(): the glue that runs the pipeline. No stage logic lives here.

    policy text ─parse─▶ Spec ─▶ Policy;  model + inputs ─capture─▶ ModelGraph
    Policy + ModelGraph ─bind─▶ Plan ─pipeline─▶ rewritten graph ─▶ CompiledModel
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

from .dsl import ast as A
from .dsl.errors import SpecError, did_you_mean
from .dsl.parser import INLINE_POLICY, parse, parse_file
from .dsl.check import check_spec

__all__ = ["compile", "plan", "load", "resolve_policy", "unwrap"]

BACKENDS = ("auto", "eager", "triton")


def _outside_inference_mode(fn):
    """Build the model outside torch.inference_mode, whatever the caller's mode: within it every
    tensor made is an inference tensor, and a model compiled or loaded in a serving process's
    inference scope could then not train its adapters nor load a state dict (raw torch errors,
    far from the compile)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():  # no autograd graph: as the caller asked
            return fn(*args, **kwargs)
    return wrapper


def plan(model, policy: str | os.PathLike | A.Spec | A.Policy = "", *, example_inputs: Mapping[str, Any] | None = None,
         name: str | None = None):
    """Bind every rule to its targets without touching a weight. Returns a Plan (`slimfx plan`);
    print() it for the table `slimfx plan` prints."""
    from .passes.bind import bind
    from .plan_table import ShownPlan

    policy_ast, spec = resolve_policy(policy, name)
    graph = _capture(model, example_inputs)
    return ShownPlan.of(bind(graph, policy_ast, source=spec.source, filename=spec.filename))


@_outside_inference_mode
def compile(model, policy: str | os.PathLike | A.Spec | A.Policy = "", *,  # noqa: A001 - the public name
            example_inputs: Mapping[str, Any] | None = None, calib=None, backend: str = "auto",
            name: str | None = None, progress: bool = False):
    """Apply `policy` to `model`; return a CompiledModel called exactly like `model`.

    `policy` is a path, policy text (a whole file, or just its rules: "quantize head int8"), or a
    parsed Spec/Policy (`name` picks one policy of a file
    that has several). `model` may itself be a CompiledModel (e.g. one whose trained adapters
    were merged: `compile(cm.merge_adapters(), "quantize …", calib=batches)`); the rules then
    act on its graph. The user's model is never modified.
    """
    from .passes.bind import bind
    from .passes.pipeline import Context, run_pipeline
    from .runtime.adapters import adapters_of
    from .runtime.compiled import CompiledModel
    from .runtime.heap import return_freed_heap
    from .runtime.progress import Progress
    from torch import nn

    _check_backend(backend)
    module = unwrap(model, None)[0]
    if backend == "triton" and isinstance(module, nn.Module):
        from .runtime.lower import check_triton_runs

        check_triton_runs(module)  # before minutes of passes, not after them
    bars = Progress.for_terminal(progress)
    policy_ast, spec = resolve_policy(policy, name)
    _warn_without_rules(policy, policy_ast, spec)
    with bars.task(f"capturing {type(module).__name__} with torch.export"):
        graph = _capture(model, example_inputs)
    bound = bind(graph, policy_ast, source=spec.source, filename=spec.filename)
    ctx = Context(calib=_calibration(model, calib, graph), source=spec.source, filename=spec.filename,
                  progress=bars, reference=module,
                  inherited_adapters=frozenset(adapters_of(graph.module)))
    try:
        report = run_pipeline(graph, bound, ctx)
    finally:
        if graph.lent is not None:
            graph.lent.give_back_written()  # the teacher's forwards moved the user's counters
            graph.lent.check()  # a pass that wrote into the user's weights is a bug, named here
    # The heap pages the passes freed go back to the system before settling copies what the graph
    # still shares with the model (the embeddings, 113 MiB on SmolLM2) and before lowering adds
    # its own buffers: measured on SmolLM2 int2 + init=error adapters, trimming after the copy
    # left compile's peak at the copy, 6 MiB over the sweep's.
    return_freed_heap()
    if graph.lent is not None:  # the graph owns what it still shares with the model from here on
        graph.lent.settle(graph.module)
    if isinstance(model, CompiledModel):  # compiled again: the report keeps what was done before
        report = report.after(model.report)
    packed = any("quant_linear" in str(n.target) for n in graph.module.graph.nodes)
    # a stage named for packed weights where there are none read as work done for nothing
    stage = {"auto": "converting packed weights for the CPU kernels" if packed else "building",
             "triton": "generating Triton kernels"}
    with bars.task(stage.get(backend, "building")):
        cm = CompiledModel(graph, report=report, policy_text=_policy_text(policy_ast),
                           policy_name=policy_ast.name if policy_ast else None, backend=backend)
    # The CPU kernels' conversion frees its temporaries (int32 codes, 4 bytes a weight) into a
    # heap glibc keeps: SmolLM2 with int4 MLPs ended compile at 1,030 MiB RSS, 653 after the trim.
    return_freed_heap()
    return cm


@_outside_inference_mode
def load(path: str | os.PathLike, *, backend: str = "auto"):
    """A CompiledModel saved with `cm.save(path)`. Never unpickles, never runs stored code.
    `backend` as in compile(): "auto" lowers quantized linears to the CPU kernels once, here."""
    from .runtime.artifact import load as load_artifact

    from .runtime.heap import return_freed_heap

    _check_backend(backend)
    cm = load_artifact(path, backend=backend)
    return_freed_heap()  # as after compile(): the kernels' conversion temporaries
    return cm


def resolve_policy(policy, name: str | None = None, *,
                   choose: str = "pass name=… (or --policy NAME) to choose one") -> tuple[A.Policy | None, A.Spec]:
    """(the one policy to apply or None for an empty spec, the Spec it came from). `choose`: the
    hint when the spec holds several policies and `name` picks none (the CLI's names its option)."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name= is the name of a policy in the file (a string), not the {type(name).__name__} "
                        f"{name!r}")
    if isinstance(policy, A.Policy):
        if name is not None and name != policy.name:  # it was ignored: the policy given ran
            raise SpecError.at("unknown-policy", f"no policy `{name}`: the Policy given is `{policy.name}`",
                               hint="leave name= out, or pass the Spec that holds the policy you mean")
        spec = A.Spec((policy,), source=policy.source, filename=policy.filename)
        check_spec(spec)  # as below
        return policy, spec
    spec = policy if isinstance(policy, A.Spec) else _read_spec(policy)
    if not spec.policies:
        if name is not None:
            raise SpecError.at("unknown-policy", f"no policy `{name}`: {spec.filename} holds none",
                               filename=spec.filename)
        return None, spec
    try:
        chosen = spec.policy(name)
    except (KeyError, ValueError) as e:
        close = did_you_mean(name, [p.name for p in spec.policies]) if name is not None else None
        raise SpecError.at("unknown-policy", str(e).strip("'\""), source=spec.source, filename=spec.filename,
                           hint=close or (choose if name is None else "use one of the names it lists")) from None
    if isinstance(policy, A.Spec):
        # a Spec parsed with check=False (or built in code) skipped the checks across rules, which
        # the passes rely on (`drop` after `quantize` compiled); the policy that runs is checked
        check_spec(A.Spec((chosen,), source=spec.source, filename=spec.filename))
    return chosen, spec


def _warn_without_rules(policy, chosen: A.Policy | None, spec: A.Spec) -> None:
    """A policy given that holds no rules (an emptied file, comments alone, `policy p {}`) compiled
    the model unchanged without a word, where `slimfx compile` refuses it. The default `""` (or
    whitespace) is the way to ask for the model captured alone: no warning there."""
    if isinstance(policy, str) and not policy.strip() or chosen is not None and chosen.rules:
        return
    what = f"policy `{chosen.name}`" if chosen is not None and chosen.name != INLINE_POLICY else "the policy"
    where = f" ({spec.filename})" if spec.filename != "<policy>" else ""
    warnings.warn(f"{what}{where} has no rules: the compiled model computes what the original does; "
                  "write rules, or leave the policy out to capture the model alone", UserWarning,
                  stacklevel=4)  # the caller of compile (through its inference-mode wrapper)


def _read_spec(policy) -> A.Spec:
    if isinstance(policy, os.PathLike):
        return parse_file(policy)
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a path, policy text, Spec or Policy, not {type(policy).__name__}")
    if "\n" not in policy and policy.strip() and _is_file(policy):  # `v{2}.slim` is a file too
        return parse_file(policy)
    # `specs/v{2}.slim`, missing, is still a path: "expected a rule, got `specs`" said nothing of a file
    path_shaped = _path_shaped(policy)
    looks_like_path = path_shaped or "\n" not in policy and "{" not in policy and policy.strip() != ""
    if not path_shaped and (_bare_rules(policy) or (looks_like_path and _one_line_of_text(policy))):
        # Rules without a `policy name { }` around them: one policy named `inline`, every line
        # and column in an error the user's own.
        return parse(policy, bare=True)
    if looks_like_path:
        raise SpecError.at("no-file", f"no policy file {policy!r}", filename=policy,
                           hint="pass an existing .slim path, or the policy text itself")
    return parse(policy)


def _path_shaped(text: str) -> bool:
    """One word that names a file: a `.slim` name or a path (rules always hold a space)."""
    words = text.split()
    return "\n" not in text and len(words) == 1 and (words[0].endswith(".slim") or "/" in text or os.sep in text)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a line of rules longer than a file name may be, a NUL in it
        return False


_RULE_WORDS = ("collapse", "drop", "heal", "adapt", "quantize", "precision", "tokens", "keep")


def _one_line_of_text(text: str) -> bool:
    """A line that is no file name: only a comment, or words and `=` outside a `.slim` name —
    `quantise head int8` gets the parser's unknown-keyword and did-you-mean, not "no policy file"."""
    line = text.strip()
    if line.startswith("#"):
        return True
    return (" " in line or "=" in line) and not line.endswith(".slim") and "/" not in line and os.sep not in line


def _bare_rules(text: str) -> bool:
    """Does the text start (after comments) with a rule rather than a `policy NAME {` header? A
    misspelt rule keyword counts as a rule, so that `quantise head int8` gets the parser's
    did-you-mean, not "expected `policy`"; a misspelt header (`polcy p {`) stays a header."""
    # A line alone may be a file name (_read_spec decides that), unless it holds a brace; with a
    # newline, even a trailing one, it is text (`quantise head int8\n` got "expected `policy`")
    text_for_sure = "\n" in text or "{" in text
    for line in text.split("\n"):  # as the parser counts lines: splitlines() also broke at a form feed
        code = line.split("#", 1)[0]
        words = code.split()
        if words:
            header = words[0] == "policy" or code.rstrip().endswith("{") or _HEADER.match(code) is not None
            return words[0] in _RULE_WORDS or (text_for_sure and not header)
    return False


# `WORD NAME {`: a policy header, its keyword perhaps misspelt. A rule's braces follow a `.`
# (`attn.{q,v}`), its keyword (`drop {…}`), or `after` (`tokens after {…}`).
_HEADER = re.compile(r"\s*\S+\s+(?!after\b)[A-Za-z_][\w-]*\s*\{")


def _capture(model, example_inputs):
    from .passes.capture import capture
    from .runtime.compiled import CompiledModel

    if isinstance(model, CompiledModel):  # compile again: its graph, copied, is the starting point
        return _recompile_source(model, example_inputs)
    model, example_inputs = unwrap(model, example_inputs)
    check_model(model)
    if example_inputs is None:
        raise TypeError("slimfx needs example_inputs: the keyword inputs the model is called with, e.g. "
                        "example_inputs=tokenizer(['hello'], return_tensors='pt') (or pass a slimfx.models.load(...) "
                        "result, which carries its own)")
    _refuse_meta(model)
    # The graph reads the model's tensors (no copy) until compile() settles: passes/lent.py.
    return capture(model, example_inputs, lend=True)


def check_model(model) -> None:
    """TypeError unless `model` (unwrapped) is what compile() takes; a name or path is told how to load it."""
    import torch

    if not isinstance(model, torch.nn.Module):  # a CompiledModel is one
        named = f" {model!r}" if isinstance(model, (str, os.PathLike)) else ""
        raise TypeError(f"slimfx compiles a torch.nn.Module (or a slimfx.models.load(...) result, or a "
                        f"CompiledModel), not the {type(model).__name__}{named}"
                        + (f": load it first, e.g. slimfx.models.load({str(model)!r})" if named else ""))


def _refuse_meta(model) -> None:
    """Weights on the meta device hold no values to quantize, fit or run: compile() failed deep
    in a pass (`Tensor.item() cannot be called on meta tensors`), or returned a model whose
    outputs were meta tensors and which could not be saved."""
    import itertools

    meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if meta:
        raise TypeError(f"{len(meta)} of the model's tensors are on the meta device (e.g. {meta[0]}): they hold "
                        "no values to compile. Load the weights first (e.g. from_pretrained without device_map='meta', "
                        "or model.to_empty(device='cpu') then load_state_dict(...))")


def _recompile_source(cm, example_inputs):
    """A CompiledModel as the model of compile()/plan(): a copy of its graph (the reference ops,
    never the CPU-kernel layouts), so `cm` itself is never changed. Typical use: adapters trained
    and merged (`cm.merge_adapters()`), then quantized by a second policy."""
    from .passes.graph import ModelGraph
    from .runtime.program_copy import copy_program

    if example_inputs is not None:
        raise TypeError("example_inputs cannot be given with a CompiledModel: its graph is already captured "
                        f"(inputs {list(cm.input_names)})")
    from .runtime.adapters import set_dropout

    program = copy_program(cm.graph)
    # The copy in eval form whatever mode `cm` is in: adapter dropout off (calibration of later
    # rules must not draw masks) and DoRA's training-only base term out (runtime/dora_dropout.py).
    set_dropout(program.module, False)
    return ModelGraph.of(program)


def unwrap(model, example_inputs):
    """A slimfx.models.LoadedModel carries its module and example inputs."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "example_inputs") and not hasattr(model, "forward"):
        return inner, example_inputs if example_inputs is not None else model.example_inputs
    return model, example_inputs


def _calibration(model, calib, graph):
    """Calibration batches, each bound as a call of the compiled model binds its inputs
    (runtime/call_inputs.py): an omitted attention_mask etc. filled, a bool or int32 mask cast.
    Keys the graph takes no input for ride along untouched (`labels` for the LoRA heal's loss, a
    mask the statistics skip padding by). A batch that does not fit (an input missing, 1-D or
    misshapen) is refused by name when a pass reads the batches, not before: a policy that never
    calibrates is not refused for it."""
    from .calibration import calibration_batches
    from .passes.context import CalibrationBatches
    from .runtime.call_inputs import CallInputs
    from .runtime.token_ids import table_rows, token_ids_input

    names = {i.name for i in graph.inputs}
    ids, table = token_ids_input(graph)
    ids, vocab = ids or "input_ids", table_rows(table) or None
    # text rows padded together where the graph takes no mask: its attention read the padding as text
    batches = calibration_batches(model, calib, ids=ids, vocab=vocab, masked="attention_mask" in names)
    out, problem = [], None
    for i, batch in enumerate(batches):
        binder = CallInputs(graph, f"compiled {graph.model_class} (calibration batch {i} of {len(batches)})",
                            fix="give each calibration batch those inputs")
        try:
            # with the flags the graph was captured with: a batch gives tensors only, and a flag
            # the example set away from its default would count as left out
            bound = binder.bind((), {**dict(graph.call.flags), **{k: v for k, v in batch.items() if k in names}})
        except (TypeError, ValueError) as e:
            problem, bound = problem or e, {k: v for k, v in batch.items() if k in names}
        out.append({**bound, **{k: v for k, v in batch.items() if k not in names}})
    return CalibrationBatches(out, problem, ids)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    # The runtime never imports the compiler: the face hands it the code generator, so every
    # model from compile() or load() can take backend="triton" (now or by set_backend later).
    from .runtime.lower import register_graph_lowering

    register_graph_lowering("triton", _lower_for_triton)


def _lower_for_triton(graph):
    from .codegen.lower import lower_graph

    return lower_graph(graph)


def _policy_text(policy: A.Policy | None) -> str:
    from .dsl.printer import format_policy

    return format_policy(policy) + "\n" if policy else ""
