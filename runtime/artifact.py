"""Artifacts: `CompiledModel.save(dir)` and `slimfx.load(dir)`, the end of the pipeline.

A saved model is three files: the weights as safetensors, the rewritten graph as slimfx's own
JSON node list (runtime/graph_io.py: operators by name from an allow-list, no weights, no code),
and meta.json (report, policy, inputs, output structure, module table, file hashes). Saving
walks the GraphModule as it is (no re-export); loading rebuilds it node by node with its
symbolic fake values. load() never unpickles and never runs code stored in the artifact.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .program import CallInfo, InputInfo, ModuleInfo, OutputSpec, ParamInfo, Program, devices_named, input_shape
from .compiled import CompiledModel
from .lower import unlowered
from .artifact_errors import FILES, META, PROGRAM, RESAVE, WEIGHTS, ArtifactError
from .artifact_files import first_line as _first_line, json_bytes as _json_bytes
from .artifact_files import read_json as _read_json, read_weights as _read_weights
from .artifact_files import sha256 as _sha256, sha256_file as _sha256_file
from .artifact_files import foreign_entries, holds_json, nearest_existing, unplaceable, write_atomic as _write_atomic
from .artifact_files import write_bytes as _write_bytes, write_weights as _write_weights
from .atomic_dir import STAGING, moved_aside
from .graph_io import GRAPH_FORMAT, decode_graph, encode_graph
from .report import Report
from .version import __version__

__all__ = ["save", "load", "ArtifactError", "FORMAT_VERSION", "FILES"]

FORMAT = "slimfx-artifact"
FORMAT_VERSION = 2  # 1: program.json in torch.export's schema (slimfx <= 0.x, before Dec 2026)
# ---- save --------------------------------------------------------------------------------------


def save(cm: CompiledModel, path: str | os.PathLike) -> None:
    """Write `cm` to the directory `path`, atomically (runtime/artifact_files.py): an existing
    artifact there is replaced only once the new one is complete, and a failed save leaves no
    partial directory behind. Files are 0644 under the usual umask."""
    target = Path(path).expanduser()  # "~/out" is the home folder's, as adapt … from= reads it
    check_target(target)
    with unlowered(cm.program):  # the artifact holds the reference graph, never kernel layouts
        doc, tensors, aliases = encode_graph(cm.graph.module, cm.graph.model_class)
    program = _json_bytes(doc, PROGRAM, indent=None)  # read by machines; meta.json by people
    meta = _meta(cm, aliases, _input_sizes(doc))

    def write(tmp: Path) -> None:
        files = {PROGRAM: _write_bytes(tmp / PROGRAM, program)}
        files[WEIGHTS] = _write_weights(tmp / WEIGHTS, tensors)
        _write_bytes(tmp / META, _json_bytes({**meta, "files": files}, "meta.json"))

    _write_atomic(target, write, last=META)  # filled in place, meta.json (the hashes) goes last


def check_target(target: Path) -> None:
    """Refuse, before any work, a path save() could not write: a file, or a non-empty directory
    that is not an artifact (`slimfx compile --out` checks it before compiling)."""
    problem = unplaceable(target)
    if problem:
        raise ArtifactError(f"cannot save to {target}: {problem}")
    above = nearest_existing(target)
    if not above.is_dir():  # mkdir would fail at the end of a compile, and the compile be lost
        raise ArtifactError(f"cannot save to {target}: {above} is a file, not a directory; choose another path")
    if target.is_dir() and any(target.iterdir()) and not holds_json(target / META, "format", FORMAT) \
            and not _leftovers_of_a_save(target):
        raise ArtifactError(f"refusing to replace {target}: it is a non-empty directory that is "
                            f"not a slimfx artifact (no {META} of one); choose a new path or empty it first")
    others = foreign_entries(target, FILES)
    if others:  # saving replaces the whole directory: they would be lost
        raise ArtifactError(f"refusing to replace {target}: besides an artifact's files it holds "
                            f"{', '.join(others[:5])}{' …' if len(others) > 5 else ''}, which saving would delete "
                            "(it replaces the whole directory); move them out, or choose a new path")


def _leftovers_of_a_save(target: Path) -> bool:
    """A folder holding only what a slimfx save writes, one of them recognisably its own (a
    staging folder, a program.json of slimfx's graph format), without a meta.json of an artifact:
    a save killed while filling a mount point in place, or an artifact whose meta.json was
    damaged. load() says to save it again, and that save was refused as "not a slimfx artifact"."""
    entries = list(target.iterdir())
    ours = [e for e in entries if e.name.startswith(STAGING) and e.is_dir() and not e.is_symlink()]
    return all(e in ours or (e.name in FILES and e.is_file()) for e in entries) and bool(
        ours or holds_json(target / PROGRAM, "format", GRAPH_FORMAT))


def _input_sizes(doc: dict[str, Any]) -> dict[str, list]:
    """Each input's sizes as program.json writes them: its symbols' names are program.json's
    (runtime/graph_io_values.py SymbolNames), not the ones capture or the last load gave them."""
    # by target: fx renames a placeholder called like a builtin (`input` -> node `input_1`)
    return {n.get("target", n["name"]): n["val"]["tensor"][1] for n in doc["nodes"]
            if n["op"] == "placeholder" and isinstance(n.get("val"), dict) and "tensor" in n["val"]}


def _meta(cm: CompiledModel, aliases: dict[str, str], sizes: dict[str, list]) -> dict[str, Any]:
    g = cm.graph
    if g.call.unstorable:  # left out, the loaded model refused the very value the graph was made for
        name = g.call.unstorable[0]
        value = dict(g.call.flags)[name]
        raise ArtifactError(f"cannot save {g.model_class}: it was captured with {name}={value!r} (a "
                            f"{type(value).__name__}), which an artifact cannot store (numbers, text, None, and "
                            f"tuples or lists of them); compile with example_inputs that leave {name} out or give "
                            "it as one of those, or keep the compiled model in memory")
    try:
        spec = json.loads(pytree.treespec_dumps(g.outputs.spec))
    except Exception as e:  # a pytree node type registered without a serialized name
        raise ArtifactError(f"cannot save the output structure of {g.model_class}: {_first_line(e)}; give its "
                            f"type a serialized name ({_REGISTER}) in the process that saves and in the one that "
                            "loads, or return a dict or tuple") from e
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "slimfx_version": __version__, "torch_version": torch.__version__,
        "model_class": g.model_class,
        "call": g.call.to_dict(),
        "policy": {"name": cm.policy_name, "text": cm.policy_text},
        "report": cm.report.to_dict(),
        "inputs": [{"name": i.name, "dtype": str(i.dtype).removeprefix("torch."),
                    "shape": sizes.get(i.name, list(i.shape)), "dims": {str(d): r for d, r in i.dims.items()},
                    **({} if i.fill else {"fill": False}),
                    **({"limits": {str(d): n for d, n in i.limits.items()}} if i.limits else {})}
                   for i in g.inputs],
        "outputs": {"spec": spec, "constants": list(g.outputs.constants),
                    "tensors": list(g.outputs.tensor_leaves)},
        "modules": [asdict(m) for m in g.modules.values()],
        "weights": {"aliases": aliases},  # tied names, for people; program.json says the rest
    }


# ---- load --------------------------------------------------------------------------------------


def load(path: str | os.PathLike, *, backend: str = "auto") -> CompiledModel:
    """The CompiledModel saved at `path`; its outputs are bit-identical to the saved one's.

    Reads JSON and safetensors only (no pickle), checks every file against the SHA-256 in
    meta.json (program.json: the very bytes it then parses), and resolves every operator via the
    allow-list in runtime/program_check.py. Whatever is wrong with the files is an ArtifactError
    that says what to do; a failure of the backend itself (lowering the program for this machine)
    is raised as it is."""
    root = Path(path).expanduser()
    try:
        meta = _read_meta(root)
        program = _read_checked(root, meta, PROGRAM)
        _read_checked(root, meta, WEIGHTS, keep=False)  # safetensors maps the file itself
    except OSError as e:  # another user's file of mode 0600: a raw PermissionError
        raise ArtifactError(f"cannot read {e.filename or root} ({e.strerror or _first_line(e)}): check that this "
                            "user may read the artifact's folder and files") from e
    try:
        graph, parts = _restore(root, meta, program)
    except ArtifactError:
        raise
    except Exception as e:  # files that hash right but do not fit together
        raise ArtifactError(f"{root} cannot be restored ({type(e).__name__}: {_first_line(e)}); "
                            f"{_likely_cause(meta)}") from e
    # Outside the blame on the files: the backend's own failures (no triton here, a kernel that
    # cannot lower) were reported as a meta.json changed after saving.
    return CompiledModel(graph, **parts, backend=backend)


def _likely_cause(meta: dict[str, Any]) -> str:
    """Another torch or slimfx may read the graph otherwise; with the same ones, meta.json (which
    no hash covers) was edited or damaged — "load it there" would send the user in a circle."""
    saved = (meta.get("slimfx_version", "?"), meta.get("torch_version", "?"))
    if saved == (__version__, torch.__version__):
        return f"{META} was changed or damaged after saving (the same slimfx and torch wrote it); {RESAVE}"
    return (f"it was saved by slimfx {saved[0]} with torch {saved[1]}, this is slimfx {__version__} with "
            f"torch {torch.__version__}: load it there, or {RESAVE}")


def _restore(root: Path, meta: dict[str, Any], program: bytes) -> tuple[Program, dict[str, Any]]:
    """The saved program, and its report and policy (CompiledModel's keywords), from files
    already checked against their hashes."""
    _register_slimfx_ops()
    doc = _read_json(root / PROGRAM, program)
    tensors = _read_weights(root / WEIGHTS)
    module = decode_graph(doc, tensors)
    _to_named_device(module)
    graph = Program(module, _modules(meta), _inputs(meta, module), _outputs(meta),
                    meta["model_class"], CallInfo.from_dict(meta.get("call")))
    _check_meta_fits(graph, meta)
    policy = meta.get("policy") or {}
    return graph, {"report": Report.from_dict(meta["report"]), "policy_text": policy.get("text") or "",
                   "policy_name": policy.get("name")}


def _to_named_device(module: torch.fx.GraphModule) -> None:
    """Weights come off the file on the CPU; a graph compiled on a GPU makes and checks its
    tensors there (load has refused one naming a device this machine lacks): its weights go
    there too, or every call failed mixing devices."""
    # "cuda" beside "cuda:0" (a forward's literal device beside export's checks) is one device
    named = {d for d in devices_named(module) if d.type != "cpu"}
    indexed = {d for d in named if d.index is not None}
    if indexed == {torch.device("cuda", 0)} and {d.type for d in named} == {"cuda"}:  # "cuda": the current, 0
        named = indexed
    if len(named) == 1:
        module.to(named.pop())
    elif named:
        raise ArtifactError(f"{PROGRAM} names several devices ({', '.join(sorted(map(str, named)))}); slimfx "
                            f"compiles for one: {RESAVE}")


def _check_meta_fits(graph: Program, meta: dict[str, Any]) -> None:
    """meta.json's outputs and flags against the program (no hash covers meta.json): an edited
    count of output tensors loaded, then every call raised a raw IndexError; a `declared` flag
    missing from `flags`, a raw KeyError."""
    output = next(n for n in graph.module.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    own = sum(graph.outputs.tensor_leaves)
    if len(results) not in (own, own + 2):  # + (positions, sizes) of token rules with restore=false
        raise ArtifactError(f"{META} names {own} output tensor(s) and {PROGRAM} returns {len(results)}; "
                            f"{_likely_cause(meta)}")
    flags = dict(graph.call.flags)
    stray = [name for name, _ in graph.call.declared if name not in flags]
    if stray:
        raise ArtifactError(f"{META}'s call declares a default for {stray}, a flag its call flags do not "
                            f"hold; {_likely_cause(meta)}")


def _register_slimfx_ops() -> None:
    """slimfx:: custom ops must be registered before the program's targets are resolved."""
    name = f"{__package__}.ops"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # ops.py exists but a dependency of it is missing: say so
            raise


def _read_meta(root: Path) -> dict[str, Any]:
    if not root.exists():
        aside = moved_aside(root)
        if aside:  # a save killed between its two renames: the previous artifact is there
            raise ArtifactError(f"no artifact at {root}: a save to it was killed after it had moved the previous "
                                f"one aside, to {aside[-1]}; rename that back to {root.name} (or save again)")
        raise ArtifactError(f"no artifact at {root}: nothing is there (an artifact is the directory cm.save(path) "
                            "or `slimfx compile --out` writes)")
    if not root.is_dir():
        raise ArtifactError(f"no artifact at {root}: it is a file, not a directory (an artifact is the directory "
                            "cm.save(path) or `slimfx compile --out` writes)")
    if not (root / META).is_file():
        raise ArtifactError(f"{root} is not a slimfx artifact: it has no {META}; {_what_else(root)}")
    meta = _read_json(root / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{root / META} does not describe a slimfx artifact; {RESAVE}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        older = (" (version 1 stored the graph in torch.export's format, which took seconds "
                 "to load)" if version == 1 else "")
        newer = (f" (slimfx {meta.get('slimfx_version', '?')} wrote it: upgrade to read it)"
                 if isinstance(version, int) and version > FORMAT_VERSION else "")
        raise ArtifactError(
            f"{root} has artifact format version {version!r}{older}; this slimfx reads version "
            f"{FORMAT_VERSION}{newer}: compile the original model with its policy again under this slimfx "
            f"(`slimfx compile … --out`; the policy is in its {META})")
    missing = [k for k in ("files", "inputs", "outputs", "modules", "weights", "model_class")
               if k not in meta]
    if missing:
        raise ArtifactError(f"{root / META} lacks {missing}: it is damaged; {RESAVE}")
    # kinds too (no hash covers meta.json): `files: "x"` read as every file truncated, and
    # `model_class: null` as a model of another class at eval
    wrong = [k for k, kind in _META_KINDS.items()
             if not isinstance(meta[k], kind) or (k in ("files", "model_class") and not meta[k])]
    if wrong:
        wanted = [("a non-empty " if k in ("files", "model_class") else "a ") + _META_KINDS[k].__name__ for k in wrong]
        raise ArtifactError(f"{root / META} holds {', '.join(f'{k}: {meta[k]!r}' for k in wrong)}, not "
                            f"{' / '.join(wanted)}: it is damaged; {RESAVE}")
    return meta


def _what_else(root: Path) -> str:
    """What to do with a folder that is no artifact, by what it holds."""
    if (root / "adapter_config.json").is_file():
        return f'it is a PEFT adapter directory: a policy loads it with `adapt … from="{root}"`'
    if (root / "config.json").is_file():
        return (f"it looks like a Hugging Face model folder: compile it (`slimfx compile SPEC --model {root} "
                "--out DIR`, or slimfx.compile), then load what that saves")
    return RESAVE


_META_KINDS = {"files": dict, "inputs": list, "outputs": dict, "modules": list, "weights": dict, "model_class": str}


def _read_checked(root: Path, meta: dict[str, Any], name: str, keep: bool = True) -> bytes:
    """The file's bytes (if `keep`), once they match the size and SHA-256 in meta.json."""
    path, want = root / name, meta["files"].get(name) or {}
    if not isinstance(want, dict):  # a damaged entry: said as one, not an AttributeError below
        raise ArtifactError(f"{root / META} records {name} as {want!r}, not its size and SHA-256: it is damaged; "
                            f"{RESAVE}")
    if not path.is_file():
        raise ArtifactError(f"{root} is incomplete: {name} is missing (an interrupted copy?); "
                            f"{RESAVE}")
    if not isinstance(want.get("bytes"), int) or isinstance(want.get("bytes"), bool):  # "150900" read as a mismatch
        raise ArtifactError(f"{root / META} records {name}'s size as {want.get('bytes')!r}, not a number of bytes: "
                            f"it is damaged; {RESAVE}")
    size = path.stat().st_size
    if size != want.get("bytes"):
        raise ArtifactError(f"{path} is {size} bytes but meta.json records "
                            f"{want.get('bytes')}: the file is truncated or was replaced; "
                            f"{RESAVE}")
    data = path.read_bytes() if keep else b""
    if (_sha256(data) if keep else _sha256_file(path)) != want.get("sha256"):
        raise ArtifactError(f"{path} does not match the SHA-256 recorded in meta.json: it was "
                            f"changed or damaged after saving; {RESAVE}")
    return data


# ---- meta.json -> graph records -----------------------------------------------------------------


def _modules(meta) -> dict[str, ModuleInfo]:
    table = {}
    for m in meta["modules"]:
        params = tuple(ParamInfo(**{**p, "shape": tuple(p["shape"])}) for p in m["params"])
        table[m["path"]] = ModuleInfo(m["path"], m["cls"], tuple(m["classes"]),
                                      tuple(m["children"]), m["is_list"], params)
    return table


def _inputs(meta, module: torch.fx.GraphModule) -> tuple[InputInfo, ...]:
    """Names and dim roles from meta.json; shapes from the loaded program, whose symbols the
    graph's seq_dim() compares against."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    names = [rec["name"] for rec in meta["inputs"]]
    if [p.target for p in placeholders] != names:
        raise ArtifactError(f"{PROGRAM} is refused: its inputs {[p.target for p in placeholders]}"
                            f" are not meta.json's {names}; {RESAVE}")
    infos = []
    for rec, p in zip(meta["inputs"], placeholders, strict=True):
        val = p.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ArtifactError(f"input {rec['name']!r} has no value in {PROGRAM}; {RESAVE}")
        if str(val.dtype).removeprefix("torch.") != rec["dtype"]:
            raise ArtifactError(f"input {rec['name']!r} is {rec['dtype']} in meta.json but "
                                f"{val.dtype} in the program; {RESAVE}")
        infos.append(InputInfo(rec["name"], input_shape(val), val.dtype,
                               {int(d): r for d, r in rec["dims"].items()}, fill=rec.get("fill") is not False,
                               limits=_limits(rec)))
    return tuple(infos)


def _limits(rec: dict) -> dict[int, int]:
    """An input's bounds (InputInfo.limits); none in artifacts of before 2026-12-08."""
    limits = rec.get("limits") or {}
    if not isinstance(limits, dict) or not all(isinstance(n, int) and not isinstance(n, bool) for n in limits.values()):
        raise ArtifactError(f"meta.json's limits of input {rec['name']!r} are {limits!r}, where a save writes "
                            f"{{dim: most}}; {RESAVE}")
    return {int(d): n for d, n in limits.items()}


def _outputs(meta) -> OutputSpec:
    out = meta["outputs"]
    _import_output_types(out["spec"])
    spec = pytree.treespec_loads(json.dumps(out["spec"]))
    if spec.num_leaves != len(out["constants"]):  # loaded, then every call failed in treespec.unflatten
        raise ArtifactError(f"meta.json's output structure has {spec.num_leaves} leaves and its constants "
                            f"{len(out['constants'])}: it is damaged; {RESAVE}")
    tensors = out.get("tensors")  # absent before 2026-12-06: a None constant then means a tensor
    if tensors is not None and (not isinstance(tensors, list) or len(tensors) != len(out["constants"])):
        raise ArtifactError(f"meta.json's output tensors {tensors!r} do not match its constants: it is damaged; {RESAVE}")
    return OutputSpec(spec, tuple(out["constants"]), None if tensors is None else tuple(map(bool, tensors)))


_TRANSFORMERS_CLASS = re.compile(r"transformers(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _import_output_types(spec: Any) -> None:
    """Register the output's pytree node types before treespec_loads looks them up. The only
    names ever imported: ModelOutput subclasses from the installed transformers."""
    for name in _spec_types(spec):
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        if not _TRANSFORMERS_CLASS.fullmatch(name):  # the artifact is fine: the type is not known here
            raise ArtifactError(f"the saved output type {name!r} is not registered in this process, nor a "
                                "transformers ModelOutput (slimfx imports no other names from an artifact): "
                                f"register it under that name ({_REGISTER}) before slimfx.load")
        from transformers.utils import ModelOutput

        module, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as e:
            raise ArtifactError(f"the saved output type {name} does not exist in the installed "
                                f"transformers: install the version that saved it") from e
        if not (isinstance(cls, type) and issubclass(cls, ModelOutput)):
            raise ArtifactError(f"the saved output type {name} is not a ModelOutput; {RESAVE}")


_REGISTER = ("torch.utils._pytree._register_namedtuple(cls, serialized_type_name=…) for a namedtuple, "
             "register_pytree_node(…, serialized_type_name=…) for another class")


def _spec_types(node: Any):
    """The type names a saved TreeSpec needs; for a namedtuple, its own serialized name (its
    node's type is collections.namedtuple, registered everywhere: an unregistered one was
    blamed on a damaged meta.json)."""
    if isinstance(node, list):  # [protocol, tree] at the top, children lists below
        for child in node:
            yield from _spec_types(child)
    elif isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        if node.get("type") == "collections.namedtuple" and isinstance(node.get("context"), str):
            yield node["context"]
        yield from _spec_types(node.get("children_spec", []))
