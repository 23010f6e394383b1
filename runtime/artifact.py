"""Artifacts: `CompiledModel.save(dir)` and `slimfx.load(dir)`, the end of the pipeline.

A saved model is three files: the weights as safetensors, the rewritten graph as torch.export's
JSON schema (no weights), and meta.json (report, policy, inputs, output structure, module table,
file hashes). load() never unpickles and never runs code stored in the artifact (runtime/program_check.py).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .program import InputInfo, ModuleInfo, OutputSpec, ParamInfo, Program
from .compiled import CompiledModel
from .artifact_errors import FILES, META, PROGRAM, RESAVE, WEIGHTS, ArtifactError
from .program_check import check_program, expected_tensors, keep_metadata
from .report import Report
from .version import __version__

__all__ = ["save", "load", "ArtifactError", "FORMAT_VERSION", "FILES"]

FORMAT = "slimfx-artifact"
FORMAT_VERSION = 1
# ---- save --------------------------------------------------------------------------------------


def save(cm: CompiledModel, path: str | os.PathLike) -> None:
    """Write `cm` to the directory `path`, atomically: everything goes to a temporary directory
    next to it, is fsynced, then renamed into place; an existing artifact there is replaced only
    once the new one is complete, and a failed save leaves no partial directory behind."""
    target = Path(path)
    _check_target(target)
    ep = _reexport(cm.graph)
    program = _program_json(ep)
    tensors, aliases = _weights(ep)
    meta = _meta(cm, aliases)

    def write(tmp: Path) -> None:
        files = {PROGRAM: _write_bytes(tmp / PROGRAM, program)}
        files[WEIGHTS] = _write_weights(tmp / WEIGHTS, tensors)
        _write_bytes(tmp / META, _json_bytes({**meta, "files": files}, "meta.json"))

    _write_atomic(target, write)


def _check_target(target: Path) -> None:
    if target.is_file():
        raise ArtifactError(f"cannot save to {target}: it is a file; pass a directory path")
    if target.is_dir() and any(target.iterdir()) and not (target / META).is_file():
        raise ArtifactError(f"refusing to replace {target}: it is a non-empty directory that is "
                            "not a slimfx artifact; choose a new path or empty it first")


def _reexport(graph: Program):
    """The rewritten GraphModule as an ExportedProgram, dynamic in the same batch/seq dims.
    Example inputs are zeros at the traced sizes (the hints of the placeholders' symbols)."""
    placeholders = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    args = tuple(_zeros_like(p.meta["val"]) for p in placeholders)
    dims = tuple({d: torch.export.Dim.AUTO for d in i.dims} or None for i in graph.inputs)
    try:
        with torch.no_grad():
            return torch.export.export(graph.module, args, dynamic_shapes=dims, strict=False)
    except Exception as e:  # export raises many types; the user needs one, with the cause
        raise ArtifactError(f"cannot save {graph.model_class}: re-exporting the rewritten graph "
                            f"failed with {type(e).__name__}: {_first_line(e)}; every op in the "
                            "graph needs a fake (meta) implementation") from e


def _zeros_like(val: torch.Tensor) -> torch.Tensor:
    sizes = [s if isinstance(s, int) else int(s.node.hint or 2) for s in val.shape]
    return torch.zeros(sizes, dtype=val.dtype, device=val.device)


def _program_json(ep) -> bytes:
    """The program as torch.export JSON, without the pickles serialize() would make of weights,
    constants and example inputs, and without guard code or stack traces (runtime/program_check.py)."""
    from torch._export.serde.serialize import serialize

    wanted = ("serialize_state_dict", "serialize_constants", "serialize_example_inputs")
    accepted = inspect.signature(serialize).parameters  # older torch pickles them all anyway
    doc = json.loads(serialize(ep, **{k: False for k in wanted if k in accepted}).exported_program)
    doc["guards_code"] = []  # Python source ep.module() would exec; shape checks stay in ranges
    keep_metadata(doc)
    return _json_bytes(doc, PROGRAM, indent=None)  # read by machines; meta.json by people


def _weights(ep) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, alias name -> stored name): tied weights are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in {**ep.state_dict, **ep.constants}.items():
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"cannot save constant {name!r} of type {type(t).__name__}: "
                                "only tensors can be stored in safetensors")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory: copy partial views of one storage.
        data = t.detach().cpu()
        tensors[name] = data.clone() if ptr in storages and t.numel() else data.contiguous()
        storages.add(ptr)
    return tensors, aliases


def _meta(cm: CompiledModel, aliases: dict[str, str]) -> dict[str, Any]:

    g = cm.graph
    try:
        spec = json.loads(pytree.treespec_dumps(g.outputs.spec))
    except Exception as e:  # a pytree node type registered without a serialized name
        raise ArtifactError(f"cannot save the output structure of {g.model_class}: "
                            f"{_first_line(e)}") from e
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "slimfx_version": __version__, "torch_version": torch.__version__,
        "model_class": g.model_class,
        "policy": {"name": cm.policy_name, "text": cm.policy_text},
        "report": cm.report.to_dict(),
        "inputs": [{"name": i.name, "dtype": str(i.dtype).removeprefix("torch."),
                    "shape": list(i.shape), "dims": {str(d): r for d, r in i.dims.items()}}
                   for i in g.inputs],
        "outputs": {"spec": spec, "constants": list(g.outputs.constants)},
        "modules": [asdict(m) for m in g.modules.values()],
        "weights": {"aliases": aliases},  # tied names; the program's signature says the rest
    }


# ---- writing files -----------------------------------------------------------------------------


def _json_bytes(doc: Any, what: str, indent: int | None = 1) -> bytes:
    try:
        return json.dumps(doc, indent=indent, ensure_ascii=False,
                          separators=None if indent else (",", ":")).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"cannot write {what}: {e}; report figures and output constants "
                            "must be plain JSON values (str, int, float, bool, None, list, dict)"
                            ) from e


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt", "writer": "slimfx"})
    except Exception as e:
        raise ArtifactError(f"cannot write {WEIGHTS}: {_first_line(e)}") from e
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an artifact is an ordinary directory
        write(tmp)
        _fsync_dir(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """rename(2) cannot replace a non-empty directory: move the old one aside first, and back
    if the new one cannot take its place."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable enough
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ---- load --------------------------------------------------------------------------------------


def load(path: str | os.PathLike) -> CompiledModel:
    """The CompiledModel saved at `path`; its outputs are bit-identical to the saved one's.

    Reads JSON and safetensors only (no pickle), checks every file against the SHA-256 in
    meta.json, and checks the program before torch deserializes it (see _check_program).
    Whatever goes wrong is an ArtifactError that says what to do."""
    root = Path(path)
    meta = _read_meta(root)
    _check_files(root, meta)
    try:
        return _restore(root, meta)
    except ArtifactError:
        raise
    except Exception as e:  # files that hash right but do not fit together: another version?
        raise ArtifactError(
            f"{root} cannot be restored ({type(e).__name__}: {_first_line(e)}); it was saved by "
            f"slimfx {meta.get('slimfx_version', '?')} with torch {meta.get('torch_version', '?')}"
            f", this is torch {torch.__version__}: load it there or {RESAVE}") from e


def _restore(root: Path, meta: dict[str, Any]) -> CompiledModel:
    _register_slimfx_ops()
    doc = _read_json(root / PROGRAM)
    check_program(doc, [i["name"] for i in meta["inputs"]])
    state, constants = _split_weights(doc, _read_weights(root / WEIGHTS), meta["weights"])
    module = _rebuild_module(doc, state, constants)
    graph = Program(module, _modules(meta), _inputs(meta, module), _outputs(meta),
                       meta["model_class"])
    policy = meta.get("policy") or {}
    return CompiledModel(graph, report=Report.from_dict(meta["report"]),
                         policy_text=policy.get("text") or "", policy_name=policy.get("name"))


def _register_slimfx_ops() -> None:
    """slimfx:: custom ops must be registered before the program's targets are resolved."""
    name = f"{__package__}.ops"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # ops.py exists but a dependency of it is missing: say so
            raise


def _read_meta(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise ArtifactError(f"no artifact at {root}: not a directory (save one with cm.save(path))")
    if not (root / META).is_file():
        raise ArtifactError(f"{root} is not a slimfx artifact: it has no {META}; {RESAVE}")
    meta = _read_json(root / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{root / META} does not describe a slimfx artifact; {RESAVE}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{root} has artifact format version {version!r}; this slimfx reads version "
            f"{FORMAT_VERSION}: load it with the slimfx that wrote it "
            f"({meta.get('slimfx_version', '?')}) or {RESAVE}")
    missing = [k for k in ("files", "inputs", "outputs", "modules", "weights", "model_class")
               if k not in meta]
    if missing:
        raise ArtifactError(f"{root / META} lacks {missing}: it is damaged; {RESAVE}")
    return meta


def _check_files(root: Path, meta: dict[str, Any]) -> None:
    for name in (PROGRAM, WEIGHTS):
        path, want = root / name, meta["files"].get(name) or {}
        if not path.is_file():
            raise ArtifactError(f"{root} is incomplete: {name} is missing (an interrupted copy?); "
                                f"{RESAVE}")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise ArtifactError(f"{path} is {size} bytes but meta.json records "
                                f"{want.get('bytes')}: the file is truncated or was replaced; "
                                f"{RESAVE}")
        if _sha256(path) != want.get("sha256"):
            raise ArtifactError(f"{path} does not match the SHA-256 recorded in meta.json: it was "
                                f"changed or damaged after saving; {RESAVE}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {RESAVE}") from e


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # a Rust parser: no pickle involved

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, or OSError for unreadable headers
        raise ArtifactError(f"{path} is not a readable safetensors file ({_first_line(e)}); "
                            f"{RESAVE}") from e


def _split_weights(doc, tensors, weights_meta) -> tuple[dict, dict]:
    """(state dict, constants) as the program's signature names them, each tensor checked
    against the shape and dtype the program expects; aliases share one tensor again."""
    aliases = weights_meta.get("aliases", {})
    known = {**tensors, **{a: tensors.get(t) for a, t in aliases.items()}}
    expected = expected_tensors(doc)
    missing = sorted(n for n in expected if known.get(n) is None)
    extra = sorted(set(known) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{WEIGHTS} does not hold the program's tensors (missing "
                            f"{missing[:5]}, unexpected {extra[:5]}); {RESAVE}")
    state, constants, params = {}, {}, {}
    for name, (kind, shape, dtype, grad) in expected.items():
        t = known[name]
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            raise ArtifactError(f"tensor {name!r} in {WEIGHTS} is {t.dtype} {tuple(t.shape)} but "
                                f"the program expects {dtype} {shape}; {RESAVE}")
        if kind == "parameter":  # one Parameter per stored tensor keeps tied weights tied
            t = params.setdefault(aliases.get(name, name), nn.Parameter(t, requires_grad=grad))
        (state if kind in ("parameter", "buffer") else constants)[name] = t
    return state, constants


def _rebuild_module(doc, state, constants) -> torch.fx.GraphModule:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    # State and constants go in as dicts, example inputs as b"": torch.load is never reached.
    ep = deserialize(SerializedArtifact(json.dumps(doc).encode("utf-8"), state, constants, b""))
    gm = ep.module(check_guards=False) if _takes(ep.module, "check_guards") else ep.module()
    for n in gm.graph.nodes:  # ops returning nothing come back without meta["val"]
        if n.op == "call_function" and "val" not in n.meta and _returns_nothing(n.target):
            n.meta["val"] = None
    return gm


def _takes(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _returns_nothing(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and not target._schema.returns


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
    vals = [n.meta["val"] for n in module.graph.nodes if n.op == "placeholder"]
    infos = []
    for rec, val in zip(meta["inputs"], vals, strict=True):
        if str(val.dtype).removeprefix("torch.") != rec["dtype"]:
            raise ArtifactError(f"input {rec['name']!r} is {rec['dtype']} in meta.json but "
                                f"{val.dtype} in the program; {RESAVE}")
        shape = tuple(s if isinstance(s, int) else str(s) for s in val.shape)
        infos.append(InputInfo(rec["name"], shape, val.dtype,
                               {int(d): r for d, r in rec["dims"].items()}))
    return tuple(infos)


def _outputs(meta) -> OutputSpec:
    out = meta["outputs"]
    _import_output_types(out["spec"])
    spec = pytree.treespec_loads(json.dumps(out["spec"]))
    return OutputSpec(spec, tuple(out["constants"]))


_TRANSFORMERS_CLASS = re.compile(r"transformers(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _import_output_types(spec: Any) -> None:
    """Register the output's pytree node types before treespec_loads looks them up. The only
    names ever imported: ModelOutput subclasses from the installed transformers."""
    for name in _spec_types(spec):
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        if not _TRANSFORMERS_CLASS.fullmatch(name):
            raise ArtifactError(f"the saved output type {name!r} is not a registered pytree "
                                "type nor a transformers ModelOutput; slimfx imports no other "
                                f"names from an artifact; {RESAVE}")
        from transformers.utils import ModelOutput

        module, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as e:
            raise ArtifactError(f"the saved output type {name} does not exist in the installed "
                                f"transformers: install the version that saved it") from e
        if not (isinstance(cls, type) and issubclass(cls, ModelOutput)):
            raise ArtifactError(f"the saved output type {name} is not a ModelOutput; {RESAVE}")


def _spec_types(node: Any):
    if isinstance(node, list):  # [protocol, tree] at the top, children lists below
        for child in node:
            yield from _spec_types(child)
    elif isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        yield from _spec_types(node.get("children_spec", []))
