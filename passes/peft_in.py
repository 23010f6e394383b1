"""`adapt … from="dir"`: a PEFT LoRA/DoRA adapter directory, read for the adapter pass
(adapters/adapt.py) and checked against the rule by bind.py, so that `plan` refuses what compile
would; here, not in the pass's folder, because the core may not import a pass (LAYOUT.md).

    adapt blocks.*.attn.{q,v} lora from="adapters/support-bot"

`read` checks everything it can before the graph changes — the directory, adapter_config.json,
the features PEFT's formulas add that slimfx's do not, the method, the rule's written rank/alpha,
and that the rule selects exactly the modules the adapter has tensors for — then adapt.py asks
`LoadedAdapter.adapter(target, site)` for each target's record and tensors (shapes checked
against the base linear). Names and the rank_pattern rule are runtime/peft_format.py's, which
also writes the format. The weights are read from safetensors only: never unpickled.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..dsl.errors import SpecError
from ..dsl.schema import FLOAT32_MAX
from ..runtime.adapters import Adapter
from ..runtime.peft_format import CONFIG, PICKLED, WEIGHTS, adapter_directory, pattern_value, split_key
from .graph import Target
from .lora import BaseSite, site_dims

if TYPE_CHECKING:  # bind.py checks a rule's directory with `check` at plan time
    from .bind import BoundRule
    from .context import Context

__all__ = ["LoadedAdapter", "check", "read"]

# adapter_config.json fields that never change what a trained LoRA/DoRA adapter computes; any other
# field set to something but off (use_rslora, lora_bias, modules_to_save, a new variant…) is refused
_HARMLESS = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out",
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "use_dora", "init_lora_weights",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config", "megatron_core",
    "qalora_group_size", "ensure_weight_tying",
}
# inits that leave the base weights alone (PiSSA, OLoRA, CorDA, LoftQ, … rewrite them at load time)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")  # and True/False


class _Errors:
    """SpecErrors at the rule's position."""

    def __init__(self, bound: BoundRule, source: str, filename: str, directory: Path | None = None):
        self.bound, self.source, self.filename, self.directory = bound, source, filename, directory

    def __call__(self, kind: str, message: str, hint: str | None = None) -> SpecError:
        # Under `from="…"`, what every one of these errors is about, when the parser gave it a span.
        span = next((p.span for p in self.bound.rule.params if p.name == "from"), None)
        if span is not None and span.line and span.line == span.end_line:
            return SpecError.at(kind, message, line=span.line, column=span.column,
                                width=max(span.end_column - span.column, 1), source=self.source,
                                filename=self.filename, hint=hint)
        return SpecError.at(kind, message, line=self.bound.line, column=self.bound.rule.span.column,
                            source=self.source, filename=self.filename, hint=hint)


@dataclass(frozen=True)
class LoadedAdapter:
    """A PEFT adapter directory, checked against the rule: per module path its rank, alpha and tensors."""

    directory: Path
    method: str  # "lora" | "dora"
    dropout: float
    ranks: dict[str, int]
    alphas: dict[str, float]
    tensors: dict[str, dict[str, torch.Tensor]]  # path -> {"lora_A", "lora_B"[, "lora_magnitude"]}
    errors: _Errors

    def adapter(self, target: Target, site: BaseSite) -> tuple[Adapter, dict[str, torch.Tensor]]:
        """The record and float32 tensors of `target`'s adapter, its shapes checked against `site`."""
        tensors = self.tensors[target.path]
        _check_dims(target.path, tensors, site_dims(site), self.errors)
        adapter = Adapter(target.path, self.method, self.ranks[target.path], self.alphas[target.path],
                          self.dropout, site.transposed)
        return adapter, {k: v.to(torch.float32).clone() for k, v in tensors.items()}


def read(source: str, bound: BoundRule, ctx: Context) -> LoadedAdapter:
    """Read and check the PEFT adapter directory `source` (relative: to the current directory)."""
    return _read(source, bound, _Errors(bound, ctx.source, ctx.filename))


def check(source: str, bound: BoundRule, text: str, filename: str) -> None:
    """`read`'s checks, for `plan` (bind.py): it said "ready" for an adapter of other modules, of
    the other method or of another model, which compile then refused. SpecError at the rule."""
    _read(source, bound, _Errors(bound, text, filename))


def _read(source: str, bound: BoundRule, errors: _Errors) -> LoadedAdapter:
    directory = _directory(source, errors)
    errors.directory = directory
    config = _config(directory, errors)
    _check_features(config, errors)
    tensors = _tensors(directory, config, errors)
    method = "dora" if config.get("use_dora") else "lora"
    _check_method(bound.rule.method, method, errors)
    _check_targets(list(tensors), [t.path for t in bound.targets], bound.protected, errors)
    ranks, alphas = _ranks_alphas(config, list(tensors), errors)
    _check_written(bound, ranks, alphas, errors)
    for path, ts in tensors.items():
        _check_rank(path, ts, ranks[path], errors)
    written = {p.name for p in bound.rule.params}
    dropout = bound.rule.get("dropout") if "dropout" in written else _dropout(config, errors)
    return LoadedAdapter(directory, method, dropout, ranks, alphas, tensors, errors)


# ---- the directory and its files -----------------------------------------------------------------

def _directory(source: str, errors: _Errors) -> Path:
    path, problem = adapter_directory(source)
    if problem is not None:
        raise errors("no-file", problem[0], hint=problem[1])
    return path


def _config(directory: Path, errors: _Errors) -> dict:
    file = directory / CONFIG  # there: adapter_directory checked it
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors("no-file", f"cannot read {file}: {e}", hint="save the adapter again with PEFT") from None
    except RecursionError:  # JSON nested thousands deep: no config PEFT writes
        raise errors("no-file", f"cannot read {file}: its JSON is nested too deeply",
                     hint="save the adapter again with PEFT") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise errors("unsupported", f"{directory} holds a PEFT {kind or 'adapter of unknown type'} adapter "
                     "(peft_type in adapter_config.json); `adapt … from=` reads LoRA and DoRA adapters "
                     "(peft_type LORA) only", hint="train a LoRA or DoRA adapter, or drop from= to start a fresh one")
    return config


def _dropout(config: dict, errors: _Errors) -> float:
    """lora_dropout as the policy's `dropout=` is checked: a probability in [0, 1). Unchecked, 5
    compiled and every call then died in the graph's aten.dropout, even in eval mode."""
    value = config.get("lora_dropout") or 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise errors("out-of-range", f"lora_dropout={value!r} in {CONFIG} is not a dropout probability in [0, 1)",
                     hint="write `dropout=P` on the rule (it overrides the file's), or mend the file")
    return float(value)


def _check_features(config: dict, errors: _Errors) -> None:
    """Refuse what PEFT would compute differently from slimfx's LoRA/DoRA (passes/lora.py)."""
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _PLAIN_INITS):
        raise errors("unsupported", f"init_lora_weights={init!r}: PEFT rewrites the base weights with this "
                     "initialisation when it loads the adapter, so it only works on those changed weights",
                     hint="convert it to a plain LoRA adapter with PEFT: save_pretrained(dir, "
                          "path_initial_model_for_weight_conversion=…)")
    if config.get("use_rslora"):
        raise errors("unsupported", "use_rslora=true: rsLoRA scales by lora_alpha/√r, slimfx by alpha/r",
                     hint=_rslora_hint(config))
    bias = config.get("bias", "none")
    if bias != "none":
        raise errors("unsupported", f'bias="{bias}": the adapter trained bias terms, which slimfx does not load',
                     hint='use a LoRA adapter trained with bias="none"')
    extra = {k: v for k, v in config.items()
             if k not in _HARMLESS and k != "bias" and v not in (None, False, {}, [], "")}
    if extra:
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in list(extra.items())[:4])
        raise errors("unsupported", f"the adapter uses {shown}: slimfx's adapter covers plain LoRA and DoRA "
                     "(no rsLoRA, lora_bias, modules_to_save, layer replication or other variants)",
                     hint="train the adapter without these options, or merge it with PEFT (merge_and_unload) "
                          "and compile the merged model")


def _rslora_hint(config: dict) -> str:
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "set use_rslora to false and each alpha to alpha·√r in adapter_config.json (the same adapter)"
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    return (f"the same adapter without rsLoRA has lora_alpha = {alpha}·√{r} = {alpha * math.sqrt(r):g}: "
            f"set that and use_rslora: false in adapter_config.json")


def _tensors(directory: Path, config: dict, errors: _Errors) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> its adapter tensors, as stored."""
    from safetensors.torch import load_file

    file = directory / WEIGHTS
    if not file.is_file():
        if (directory / PICKLED).is_file():
            raise errors("unsupported", f"{directory} has only {PICKLED}, a pickle, which slimfx never loads "
                         "(unpickling can run code)", hint=_convert_hint(directory))
        raise errors("no-file", f"{directory} has no {WEIGHTS}", hint="save the adapter again with PEFT")
    try:
        flat = load_file(str(file))
    except Exception as e:  # SafetensorError, OSError
        raise errors("no-file", f"cannot read {file}: {str(e).strip()[:200]}",
                     hint="save the adapter again with PEFT") from None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, t in flat.items():
        split = split_key(key)
        if split is None:
            other.append(key)
        else:
            grouped.setdefault(split[0], {})[split[1]] = t
    if other:
        # PEFT's save_embedding_layers="auto" saves the base weight of an adapted tied head (or an
        # embedding) beside the adapter: the model's own weight, which the adapter does not need
        based = all(".base_layer." in k for k in other)
        raise errors("unsupported", f"{file.name} holds tensors that are not LoRA/DoRA weights of linears: "
                     f"{_few(other)}" + (" (a base weight PEFT saved beside the adapter)" if based else ""),
                     hint="save the adapter again with `save_pretrained(dir, save_embedding_layers=False)`: the "
                     "model already holds that weight" if based else "slimfx loads adapters of linear layers "
                     "(lora_A, lora_B, lora_magnitude_vector) only")
    _check_complete(grouped, bool(config.get("use_dora")), errors)
    return grouped


def _convert_hint(directory: Path) -> str:
    bin_file, out = directory / PICKLED, directory / WEIGHTS
    return (f'convert it once, if you trust the file: python -c "import torch; from safetensors.torch import '
            f"save_file; save_file(torch.load('{bin_file}', weights_only=True), '{out}')\" — or load it with "
            "PEFT and save_pretrained() again (safetensors is PEFT's default)")


def _check_complete(grouped: dict[str, dict], dora: bool, errors: _Errors) -> None:
    want = {"lora_A", "lora_B"} | ({"lora_magnitude"} if dora else set())
    for path, ts in grouped.items():
        if set(ts) != want:
            raise errors("unsupported", f"{path} has tensors {sorted(ts)} where a "
                         f"{'DoRA' if dora else 'LoRA'} adapter (use_dora={str(dora).lower()}) has {sorted(want)}",
                         hint="save the adapter again with PEFT")
    if not grouped:
        raise errors("unsupported", f"{WEIGHTS} holds no adapter tensors", hint="save the adapter again with PEFT")


# ---- the adapter against the rule ----------------------------------------------------------------

def _check_method(written: str, method: str, errors: _Errors) -> None:
    if written != method:
        other = {"lora": "a LoRA adapter (use_dora: false)", "dora": "a DoRA adapter (use_dora: true)"}[method]
        raise errors("invalid-combination", f"the rule says `{written}` but {errors.directory} holds {other}",
                     hint=f"write `adapt … {method} from=…`")


def _check_targets(adapted: list[str], selected: list[str], kept: tuple[str, ...], errors: _Errors) -> None:
    only_adapter = [p for p in adapted if p not in set(selected)]
    only_rule = [p for p in selected if p not in set(adapted)]
    if not (only_adapter or only_rule):
        return
    if only_adapter and not only_rule and set(only_adapter) <= set(kept):  # the selector was right: `keep` took them
        raise errors("invalid-combination", f"{errors.directory} adapts {_few(only_adapter)}, which the rule selects "
                     "but `keep` protects: an adapter is brought in whole or not at all",
                     hint="take those modules out of the `keep` rule, or use an adapter trained without them")
    sides = []
    if only_rule:
        sides.append(f"selected by the rule but not in the adapter: {_few(only_rule)}")
    if only_adapter:
        sides.append(f"in the adapter but not selected: {_few(only_adapter)}")
    raise errors("invalid-combination", f"the rule selects {len(selected)} linears and {errors.directory} "
                 f"adapts {len(adapted)} modules, not the same ones — " + "; ".join(sides),
                 hint=_prefix_hint(adapted, selected) or "change the selector to select exactly the adapter's "
                 "modules (`slimfx plan` lists what a selector takes)")


def _prefix_hint(adapted: list[str], selected: list[str]) -> str | None:
    """A wrapper's prefix (`bert.`) on one side only: the adapter was trained on another class."""
    for longer, shorter, side in ((adapted, selected, "the adapter's"), (selected, adapted, "this model's")):
        prefixes = {a[:-len(s)] for a in longer for s in shorter if a.endswith("." + s)}
        if len(prefixes) == 1 and len(longer) == len(shorter):
            return (f"{side} module paths start with an extra `{prefixes.pop()}`: the adapter was trained on "
                    "another class of this model (e.g. …ForSequenceClassification around …Model); compile "
                    "that same class")
    return None


def _ranks_alphas(config: dict, paths: list[str], errors: _Errors) -> tuple[dict[str, int], dict[str, float]]:
    ranks_p, alphas_p = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    try:
        ranks = {p: int(pattern_value(ranks_p, p, r)) for p in paths}
        alphas = {p: float(pattern_value(alphas_p, p, alpha)) for p in paths}
    except Exception as e:  # a malformed pattern, or a rank that is not a number
        raise errors("unsupported", f"cannot read r/lora_alpha/rank_pattern/alpha_pattern of "
                     f"{errors.directory / CONFIG}: {e}", hint="save the adapter again with PEFT") from None
    # as the policy's rank=/alpha= are checked: int() cut "r": 4.5 to 4, and lora_alpha NaN compiled
    # a model whose every output was NaN
    for path in paths:
        r_p, a_p = pattern_value(ranks_p, path, r), pattern_value(alphas_p, path, alpha)
        if isinstance(r_p, bool) or float(r_p) != ranks[path] or ranks[path] < 1:
            raise errors("out-of-range", f"r={r_p!r} for {path} in {errors.directory / CONFIG} is not an integer ≥ 1",
                         hint="mend r / rank_pattern in the file, or save the adapter again with PEFT")
        # at most float32's largest, as the policy's alpha=: the scale alpha/r is a float32 factor
        if isinstance(a_p, bool) or not math.isfinite(alphas[path]) or not 0 < alphas[path] <= FLOAT32_MAX:
            raise errors("out-of-range", f"lora_alpha={a_p!r} for {path} in {errors.directory / CONFIG} is not a "
                         "number > 0 and at most 3.4e38 (float32's largest)",
                         hint="mend lora_alpha / alpha_pattern in the file")
    return ranks, alphas


def _check_written(bound: BoundRule, ranks: dict[str, int], alphas: dict[str, float], errors: _Errors) -> None:
    """rank=/alpha= written beside from= must agree with the adapter (they cannot change it)."""
    written = {p.name for p in bound.rule.params}
    for name, values, field in (("rank", ranks, "r"), ("alpha", alphas, "lora_alpha")):
        if name not in written:
            continue
        want = bound.rule.get(name)
        other = {p: v for p, v in values.items() if float(v) != float(want)}
        if other:
            shown = ", ".join(f"{v:g}" for v in sorted(set(other.values())))
            raise errors("invalid-combination", f"{name}={want:g} is written in the rule but the adapter in "
                         f"{errors.directory} has {name} {shown} on {_few(list(other))} ({field} / "
                         f"{name}_pattern in {CONFIG})",
                         hint=f"drop {name}= (from= takes the adapter's own rank and alpha)")


def _check_rank(path: str, ts: dict[str, torch.Tensor], rank: int, errors: _Errors) -> None:
    a, b = ts["lora_A"], ts["lora_B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise errors("unsupported", f"{path}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}, but a "
                     f"linear's rank-{rank} adapter (r in {CONFIG}) has [{rank}, in] and [out, {rank}]",
                     hint="slimfx loads adapters of linear layers; save the adapter again with PEFT")


def _check_dims(path: str, ts: dict[str, torch.Tensor], dims: tuple[int, int], errors: _Errors) -> None:
    out_features, in_features = dims
    a, b, m = ts["lora_A"], ts["lora_B"], ts.get("lora_magnitude")
    bad_m = m is not None and tuple(m.shape) != (out_features,)
    if a.shape[1] != in_features or b.shape[0] != out_features or bad_m:
        got = f"lora_A {list(a.shape)}, lora_B {list(b.shape)}"
        got += f", magnitude {list(m.shape)}" if m is not None else ""
        raise errors("unsupported", f"{path} is a {out_features}×{in_features} linear (out×in) but the adapter "
                     f"in {errors.directory} has {got}: it was trained on a model of other sizes",
                     hint="load an adapter trained on this model")


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
