"""PEFT's adapter directory format, both ways: `CompiledModel.save_adapters(dir)` writes it here,
and `adapt … from="dir"` (passes/peft_in.py) reads it with the names and the pattern
rule defined here. PEFT itself is not needed for either.

A directory is `adapter_config.json` (a LoraConfig: r, lora_alpha, target_modules, …) and
`adapter_model.safetensors`, whose keys are PEFT's own:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight     [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight     [out, r]
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector   [out]  (DoRA)

The module paths are the captured model's, which are the original model's, so
`peft.PeftModel.from_pretrained(original_model, dir)` reproduces the compiled model's outputs.
"""
from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

from .adapters import Adapter, adapters_of
from .artifact_files import foreign_entries, holds_json, json_bytes, unplaceable, write_atomic, write_bytes, write_weights

__all__ = ["PeftFormatError", "save_adapters", "peft_config", "tensor_key", "split_key", "pattern_value",
           "adapter_directory", "CONFIG", "WEIGHTS", "PICKLED", "PREFIX", "KEYS"]

CONFIG, WEIGHTS, PICKLED = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModel.base_model (a LoraModel) .model (the original model)
KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
_OLD_MAGNITUDE = "lora_magnitude_vector.weight"  # how PEFT < 0.12 named DoRA's magnitude


def adapter_directory(source: str) -> tuple[Path | None, tuple[str, str] | None]:
    """`from="…"` as a directory (a relative path is taken from the current directory), or
    (None, (message, hint)) saying why it is none. `plan` asks too, so that it refuses what
    compile would (it said "ready" for a directory that is not there)."""
    path = Path(source).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if path.is_dir():
        if not (path / CONFIG).is_file():  # a folder of something else: plan said "ready"
            return None, (f"{path} is not a PEFT adapter directory: it has no {CONFIG}",
                          "pass the directory PEFT's save_pretrained() or cm.save_adapters() wrote")
        return path, None
    if path.exists():
        return None, (f'from="{source}" is a file ({path}), not a PEFT adapter directory',
                      f"pass the directory holding {CONFIG} and {WEIGHTS}")
    return None, (f'from="{source}": no directory {path} (a relative path is taken from the current directory, '
                  f"{Path.cwd()})", "pass the directory PEFT's save_pretrained() or cm.save_adapters() wrote")


class PeftFormatError(ValueError):
    """Adapters that cannot be written as one PEFT adapter directory; the message says what to do."""


def save_adapters(cm, path: str | os.PathLike, targets: Iterable[str] | None = None) -> None:
    """Write the adapters of `cm` (or of the module paths `targets` only) to the directory `path`
    in PEFT's format, atomically; an existing PEFT adapter directory there is replaced.

    >>> cm = slimfx.compile(llama, "adapt blocks.*.attn.{q, v} lora rank=4",
    ...                     example_inputs={"input_ids": ids, "attention_mask": mask})
    >>> cm.save_adapters(tmp / "support-bot")
    >>> pm = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp / "support-bot")
    >>> torch.equal(pm(input_ids=ids, attention_mask=mask).logits, cm(ids, mask).logits)
    True

    PEFT loads them over the original model's weights: adapters a policy put beside quantized
    weights (QLoRA) reproduce the compiled model only up to that quantization."""
    target = Path(path).expanduser()
    adapters = _chosen(adapters_of(cm.program), targets)
    _warn_beside_quantized(cm, adapters)
    _warn_after_removed_blocks(cm)
    config = peft_config(adapters)
    tensors = {tensor_key(a.target, name): t for a in adapters for name, t in _tensors(cm.program, a).items()}
    _check_target(target)

    def write(tmp: Path) -> None:
        write_bytes(tmp / CONFIG, json_bytes(config, CONFIG, indent=2))
        write_weights(tmp / WEIGHTS, tensors)

    write_atomic(target, write, last=CONFIG)  # filled in place, the config goes last


def _chosen(found: dict[str, Adapter], targets: Iterable[str] | None) -> list[Adapter]:
    if not found:
        raise PeftFormatError("this compiled model has no adapters to save: add them with an `adapt` rule "
                              "(e.g. `adapt blocks.*.attn.{q,v} lora rank=16`) and compile again; adapters "
                              "merged into the weights (merge=true, merge_adapters()) are gone: save that "
                              "model with cm.save(path)")
    if targets is None:
        return list(found.values())
    targets = list(targets)
    missing = [t for t in targets if t not in found]
    if missing or not targets:
        raise PeftFormatError(f"no adapter on {', '.join(missing) or '(no targets given)'}; the adapted "
                              f"modules are {_few(found)}")
    return [found[t] for t in targets]


def peft_config(adapters: list[Adapter]) -> dict:
    """The LoraConfig (as JSON) of `adapters`: the commonest rank and alpha as r and lora_alpha,
    the others per module path in rank_pattern/alpha_pattern."""
    _check_expressible(adapters)
    r = Counter(a.rank for a in adapters).most_common(1)[0][0]
    alpha = Counter(a.alpha for a in adapters).most_common(1)[0][0]
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True,
        "r": r, "lora_alpha": _number(alpha), "lora_dropout": adapters[0].dropout,
        "target_modules": [a.target for a in adapters],
        "rank_pattern": {a.target: a.rank for a in adapters if a.rank != r},
        "alpha_pattern": {a.target: _number(a.alpha) for a in adapters if a.alpha != alpha},
        # per module PEFT corrects it anyway (with a warning) where Linear and Conv1D targets mix
        "fan_in_fan_out": any(a.transposed for a in adapters),
        "use_dora": adapters[0].method == "dora", "use_rslora": False,
        "bias": "none", "lora_bias": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
    }


def _check_expressible(adapters: list[Adapter]) -> None:
    """PEFT's one config has a single use_dora and lora_dropout for every target."""
    for what, key in (("methods", lambda a: a.method), ("dropouts", lambda a: a.dropout)):
        groups: dict = {}
        for a in adapters:
            groups.setdefault(key(a), []).append(a.target)
        if len(groups) > 1:
            sides = "; ".join(f"{k} on {_few(v)}" for k, v in groups.items())
            raise PeftFormatError(
                f"these adapters have different {what} ({sides}), and a PEFT adapter_config.json has one "
                f"{'use_dora' if what == 'methods' else 'lora_dropout'} for all its modules. Save each group "
                "to its own directory with slimfx.runtime.peft_format.save_adapters(cm, path, targets=[…]) "
                "and load both in PEFT (PeftModel.from_pretrained, then load_adapter with another name, and "
                "activate both with model.base_model.set_adapter([name1, name2]))")


def _tensors(gm: torch.nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    names = ("lora_A", "lora_B") + (("lora_magnitude",) if adapter.method == "dora" else ())
    return {n: gm.get_parameter(f"{adapter.target}.{n}").detach().to("cpu", torch.float32).contiguous()
            for n in names}


def _warn_beside_quantized(cm, adapters) -> None:
    """PEFT loads the adapters over the original float weights: where a policy put them beside
    quantized (or half) weights, as QLoRA and `init=error` do, the PeftModel matches the compiled
    model only up to that quantization. Said, not refused: it is how QLoRA adapters are shared."""
    beside = [a.target for a in adapters if not hasattr(cm.program.get_submodule(a.target), "weight")]
    if beside:
        warnings.warn(f"{len(beside)} of the {len(adapters)} adapters sit beside weights the policy quantized "
                      f"({beside[0]}{' …' if len(beside) > 1 else ''}): PeftModel.from_pretrained(original_model, "
                      "dir) puts them over the original float weights, so it gives the compiled model's outputs "
                      "only up to that quantization", stacklevel=4)  # the user's cm.save_adapters(…)


def _warn_after_removed_blocks(cm) -> None:
    """Adapters of a model whose blocks a `drop`/`collapse` removed (this compile or an earlier
    one) land on the original's full depth, where PEFT computes another model (0.18 off after one
    tiny block dropped, 0.83 after a merge): said, as for quantized bases."""
    reports = (*cm.report.earlier, cm.report)
    gone = [b for r in reports for rule in r.rules if rule.kind in ("drop", "collapse") for b in rule.targets]
    if gone:
        warnings.warn(f"the compiled model has {len(gone)} block{'s' * (len(gone) != 1)} removed or merged "
                      f"({gone[0]}{' …' if len(gone) > 1 else ''}): PeftModel.from_pretrained(original_model, dir) "
                      "puts these adapters on the original's every block, which computes another model; "
                      "cm.save(path) keeps the compiled one", stacklevel=4)  # the user's cm.save_adapters(…)


def _check_target(target: Path) -> None:
    problem = unplaceable(target)
    if problem:
        raise PeftFormatError(f"cannot save adapters to {target}: {problem}")
    if target.is_dir() and any(target.iterdir()) and not holds_json(target / CONFIG, "peft_type"):
        raise PeftFormatError(f"refusing to replace {target}: it is a non-empty directory without the "
                              f"{CONFIG} of a PEFT adapter; choose a new path or empty it first")
    others = foreign_entries(target, (CONFIG, WEIGHTS))
    if others:  # saving replaces the whole directory (PEFT's README.md, a tokenizer, checkpoints…)
        raise PeftFormatError(f"refusing to replace {target}: besides the adapter's files it holds "
                              f"{', '.join(others[:5])}{' …' if len(others) > 5 else ''}, which saving would "
                              "delete (it replaces the whole directory); move them out, or choose a new path")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _few(paths, n: int = 3) -> str:
    paths = list(paths)
    more = f" (+{len(paths) - n} more)" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


# ---- names both ways -------------------------------------------------------------------------------

def tensor_key(path: str, name: str) -> str:
    """PEFT's safetensors key of the adapter parameter `name` ("lora_A", …) of module `path`."""
    return f"{PREFIX}{path}.{KEYS[name]}"


def split_key(key: str) -> tuple[str, str] | None:
    """(module path, parameter name) of a PEFT LoRA/DoRA key, or None for any other key."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    for name, suffix in (*KEYS.items(), ("lora_magnitude", _OLD_MAGNITUDE)):
        if rest.endswith("." + suffix):
            return rest[:-len(suffix) - 1], name
    return None


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern rule: the value of the first key that matches the end of
    `path` at a dot (a regex, `^` anchors it), else `default`. `{"q_proj": 8}` gives every
    …q_proj 8; save_adapters writes full paths, which match only themselves."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return patterns[key]
    return patterns.get(path, default)
