"""What check_policy draws and how it builds inputs from a draw: batch sizes, sequence lengths and
padding (masks with zeros at the left or right end, or none) within what the compiled graph and
the original model take, and every input the example inputs have, with their names and dtypes.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable, Mapping

import torch
from hypothesis import strategies as st
from torch import nn

from .passes.eval_mode import eval_mode

__all__ = ["Draw", "Space", "PADDINGS", "PADDING_CHOICES", "IGNORE_INDEX", "draws", "fixed_draws", "draw_mask", "build_inputs",
           "input_space", "within_the_model", "first_line", "default_max_seq", "sliding_window"]

PADDINGS = ("none", "right", "left")  # "none" first: hypothesis shrinks towards it
# check_policy's `padding=`: which sides of rows its masks pad.
PADDING_CHOICES = {"both": PADDINGS, "right": ("none", "right"), "left": ("none", "left"), "none": ("none",)}
IGNORE_INDEX = -100  # the label of a position the loss skips (torch's cross_entropy, Hugging Face)
_MAX_SEED = 2**31 - 1
DEFAULT_MAX_SEQ = 32  # check_policy's longest sequence when the model asks for no more
# A sliding window up to this long is reached by default (check_policy draws just past it); a
# longer one (4,096 in real Mistral/Gemma configs) costs too much per draw on a CPU, so it is said.
WINDOW_REACH = 256


@dataclasses.dataclass(frozen=True)
class Draw:
    """One drawn input: batch, sequence length (None when no input has one), padding side and the
    number of padded (mask = 0) positions per row, the seed of the token ids / float values, and
    the name of the mask input padding is written into (None: the model takes none)."""

    batch: int
    seq: int | None
    padding: str  # "none" | "left" | "right"
    pads: tuple[int, ...]
    seed: int
    mask: str | None = "attention_mask"

    def describe(self) -> str:
        parts = [f"batch={self.batch}"]
        if self.seq is not None:
            parts.append(f"seq={self.seq}")
            if self.mask is None:
                pass  # nothing to pad: no word about a mask the model does not take
            elif self.padding == "none":
                parts.append(f"padding=none ({self.mask} masks nothing)")
            else:
                parts.append(f"padding={self.padding} (masked positions per row: {list(self.pads)})")
        parts.append(f"seed={self.seed}")
        return ", ".join(parts)


# ---- how inputs are built ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Input:
    name: str
    kind: str  # "mask" | "ids" | "positions" | "int" | "bool" | "float"
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]  # the example's shape; batch/seq dims are replaced per draw
    dims: Mapping[int, str]  # {0: "batch", 1: "seq"}
    low: float = 0.0  # ints: values in [low, high); floats: mean
    high: float = 1.0  # floats: std
    pads_are_true: bool = False  # a mask whose nonzero entries are the padding (PyTorch's key_padding_mask)


@dataclasses.dataclass(frozen=True)
class Space:
    inputs: tuple[_Input, ...]
    batch: tuple[int, int]
    seq: tuple[int, int] | None
    pad_id: int | None
    paddings: tuple[str, ...] = PADDINGS  # the sides drawn (check_policy's `padding=`)

    @property
    def mask_name(self) -> str | None:
        return next((i.name for i in self.inputs if i.kind == "mask" and i.dims.get(1) == "seq"), None)


def _pick(space: Space, integer: Callable[[int, int], int], choose: Callable[[tuple], Any]) -> Draw:
    """One draw, its choices made by `integer(lo, hi)` (inclusive) and `choose(options)`: hypothesis'
    strategies in a test, a seeded Random where hypothesis cannot draw (an outer @example)."""
    batch = integer(*space.batch)
    seq = integer(*space.seq) if space.seq else None
    padding, pads = "none", (0,) * batch
    if space.mask_name and seq is not None and seq > 1 and len(space.paddings) > 1:
        padding = choose(space.paddings)
        if padding != "none":
            # The first row is always padded, so a drawn side is a real padding pattern;
            # every row keeps at least one real token.
            pads = (integer(1, seq - 1), *(integer(0, seq - 1) for _ in range(batch - 1)))
    return Draw(batch, seq, padding, pads, integer(0, _MAX_SEED), space.mask_name)


def draws(space: Space) -> st.SearchStrategy[Draw]:
    @st.composite
    def draw_one(draw) -> Draw:
        return _pick(space, lambda lo, hi: draw(st.integers(lo, hi)), lambda xs: draw(st.sampled_from(xs)))

    return draw_one()


def fixed_draws(space: Space, n: int) -> list[Draw]:
    """n draws without hypothesis: the simplest input (what shrinking ends at), then seeded ones."""
    rng = random.Random(0)
    return [_pick(space, lambda lo, hi: lo, lambda xs: xs[0])] + [
        _pick(space, rng.randint, rng.choice) for _ in range(n - 1)]


def draw_mask(d: Draw) -> torch.Tensor | None:
    if d.seq is None:
        return None
    mask = torch.ones(d.batch, d.seq, dtype=torch.long)
    for row, p in enumerate(d.pads):
        if p and d.padding == "left":
            mask[row, :p] = 0
        elif p and d.padding == "right":
            mask[row, d.seq - p:] = 0
    return mask


def build_inputs(space: Space, d: Draw) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(d.seed)
    mask = draw_mask(d)
    out: dict[str, torch.Tensor] = {}
    for spec in space.inputs:
        shape = list(spec.shape)
        for dim, role in spec.dims.items():
            shape[dim] = d.batch if role == "batch" else (d.seq if role == "seq" and d.seq else shape[dim])
        token_shaped = mask is not None and len(shape) == 2 and spec.dims.get(1) == "seq"
        if spec.kind == "mask":
            value = mask if token_shaped else torch.ones(shape, dtype=torch.long)
            if spec.pads_are_true:
                value = value == 0
        elif spec.kind == "positions" and token_shaped:
            value = torch.arange(d.seq).expand(d.batch, d.seq).clone()
        elif spec.kind in ("ids", "labels", "int", "positions"):
            value = torch.randint(int(spec.low), int(spec.high), shape, generator=gen)
            if spec.kind == "labels" and token_shaped:
                value[mask == 0] = IGNORE_INDEX  # a padded position has no label: the loss skips it
            elif spec.kind == "ids" and token_shaped and space.pad_id is not None:
                value[mask == 0] = space.pad_id
        elif spec.kind == "bool":
            value = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            value = torch.randn(shape, generator=gen, dtype=torch.float64) * spec.high + spec.low
        out[spec.name] = value.to(dtype=spec.dtype, device=spec.device)
    return out


def input_space(compiled, module: nn.Module, example: Mapping[str, torch.Tensor], max_batch: int,
                max_seq: int) -> Space:
    config = getattr(module, "config", None)
    vocab = _vocab_size(module, config)
    bounds = _dim_bounds(compiled)
    inputs, batch, seq = [], [1, max_batch], None
    for info in compiled.graph.inputs:
        value = example[info.name]
        inputs.append(_describe_input(info, value, vocab, config, type(module).__name__))
        for dim, role in info.dims.items():
            size = info.shape[dim]
            # a size the graph fixed (a forward that flattens its 8 tokens): only it runs; drawing
            # others failed in the original and blamed the example inputs
            fixed = int(size) if isinstance(size, int) or str(size).isdigit() else None
            lo, hi = (fixed, fixed) if fixed is not None else bounds.get(str(size), (1, None))
            if role == "batch":
                batch = [max(batch[0], lo), min(batch[1], hi) if hi else batch[1]]
            elif role == "seq":
                seq = seq or [1, max_seq]
                seq = [max(seq[0], lo), min(seq[1], hi) if hi else seq[1]]
    if seq is not None:
        limit = _max_positions(config)
        if limit:
            seq[1] = min(seq[1], limit)
    for name, rng in (("batch", batch), ("seq", seq)):
        if rng is not None and rng[0] > rng[1]:
            raise ValueError(f"check_policy: no {name} size to draw: the compiled model allows "
                             f"{name} >= {rng[0]}, the limit is {rng[1]} (raise max_{name})")
    pad = getattr(config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and (vocab is None or 0 <= pad < vocab) else None
    return Space(tuple(inputs), tuple(batch), tuple(seq) if seq else None, pad)


def _dim_bounds(compiled) -> dict[str, tuple[int, int | None]]:
    """{symbol: (lowest, highest or None)} from the exported graph's range constraints.

    torch.export reports every dynamic dim as >= 2 (capture widens sizes 0/1 so export does not
    specialize them) and the captured graphs run sizes 1 exactly (tests/passes/test_capture.py),
    so a lower bound of 2 means 1; a higher one is a real constraint."""
    out = {}
    for sym, rng in (getattr(compiled.program, "range_constraints", None) or {}).items():
        lo = int(rng.lower) if _finite(rng.lower) else 1
        hi = int(rng.upper) if _finite(rng.upper) else None
        out[str(sym)] = (1 if lo <= 2 else lo, hi)
    return out


def _finite(x) -> bool:
    """A sympy bound (an Integer, or int_oo / -int_oo) that is a plain integer."""
    import sympy  # torch's own dependency; only reached with a compiled graph in hand

    return isinstance(x, (int, sympy.Integer))


def _vocab_size(module: nn.Module, config) -> int | None:
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def sliding_window(config) -> int | None:
    """The attention window of a model with one in force below its position table (gemma2's
    alternate layers, Mistral's, GPT-Neo's local layers; a multimodal config's text model's),
    else None: beyond it the attention mask differs from a causal one."""
    text = getattr(config, "text_config", None)
    inner = sliding_window(text) if text is not None and text is not config else None
    if inner is not None:
        return inner
    if "local" in (getattr(config, "attention_layers", None) or ()):  # GPT-Neo's local layers
        window = getattr(config, "window_size", None)
    else:
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if getattr(config, "use_sliding_window", True) is False or (  # Qwen2's switch
                isinstance(types, (list, tuple)) and "sliding_attention" not in types):
            return None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    positions = _max_positions(config)
    return None if positions is not None and window >= positions else window


def default_max_seq(module: nn.Module) -> tuple[int, str | None]:
    """check_policy's longest sequence when none is given, and a note when that misses part of the
    model: 32 tokens, or a few past the model's sliding window when it is short enough to run (a
    policy that broke the windowed mask showed only beyond it; tiny gemma2's window is 64)."""
    window = sliding_window(getattr(module, "config", None))
    if window is None or window < DEFAULT_MAX_SEQ:
        return DEFAULT_MAX_SEQ, None
    if window + 8 <= WINDOW_REACH:
        return window + 8, None
    return DEFAULT_MAX_SEQ, (f"check_policy: inputs of up to {DEFAULT_MAX_SEQ} tokens never reach the model's "
                             f"{window}-token sliding window; pass max_seq={window + 8} to check past it")


def _max_positions(config) -> int | None:
    for field in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _describe_input(info, value: torch.Tensor, vocab: int | None, config, model_class: str = "") -> _Input:
    name, dtype = info.name, value.dtype
    common = dict(name=name, dtype=dtype, device=value.device, shape=tuple(value.shape), dims=dict(info.dims))
    if dtype.is_floating_point or dtype.is_complex:
        if "mask" in name:
            return _Input(kind="mask", **common)
        std = float(value.double().std()) if value.numel() > 1 else 1.0
        return _Input(kind="float", low=float(value.double().mean()),
                      high=std if math.isfinite(std) and std > 0 else 1.0, **common)
    if "key_padding_mask" in name:  # PyTorch's nn.Transformer/MultiheadAttention: True = padding
        return _Input(kind="mask", pads_are_true=True, **common)
    if dtype == torch.bool:
        return _Input(kind="mask" if "mask" in name else "bool", **common)
    if "mask" in name:
        return _Input(kind="mask", **common)
    if name == "position_ids":
        return _Input(kind="positions", low=0, high=max(int(value.max()) + 1, 1), **common)
    if name == "labels" and (value.dim() == 1 or model_class.endswith("ForTokenClassification")):
        # class ids (one per sequence, or per token), not token ids: drawn from the vocabulary, a
        # classifier's loss failed on its first draw ("Target 39 is out of bounds")
        classes = getattr(config, "num_labels", None)
        high = classes if isinstance(classes, int) and classes > 0 else int(value.max()) + 1
        return _Input(kind="labels", low=0, high=max(high, 1), **common)
    if name.endswith("input_ids") or name == "labels":
        high = vocab if vocab else int(value.max()) + 1
        return _Input(kind="labels" if name == "labels" else "ids", low=0, high=max(high, 1), **common)
    if name == "token_type_ids" and isinstance(getattr(config, "type_vocab_size", None), int):
        return _Input(kind="int", low=0, high=max(config.type_vocab_size, 1), **common)
    return _Input(kind="int", low=int(value.min()), high=int(value.max()) + 1, **common)


def within_the_model(space: Space, module, consts) -> Space:
    """The space with its longest sequence one the original model takes. A position table can be
    shorter than any config field says (RoBERTa's positions start after its padding index; a
    hand-written model has no config): the original runs the longest unpadded sequence, and on an
    error the longest it takes is searched for. The compiled model is not asked: a length it
    refuses where the original runs is what check_policy reports."""
    if space.seq is None:
        return space
    lo, hi = space.seq

    def runs(n: int) -> Exception | None:
        d = Draw(1, n, "none", (0,), 0, space.mask_name)
        try:
            with torch.no_grad(), eval_mode(module):
                module(**build_inputs(space, d), **consts)
        except Exception as e:  # noqa: BLE001 - said below when no length runs
            return e
        return None

    if runs(hi) is None:
        return space
    first = runs(lo)
    if first is not None:
        simplest = Draw(1, lo, "none", (0,), 0, space.mask_name)
        raise ValueError(f"check_policy: the original model raised {type(first).__name__}: {first_line(first)} "
                         f"on the simplest input drawn like the example inputs ({simplest.describe()}): check "
                         "example_inputs, or call the model with them yourself to see why")
    while lo < hi - 1:  # runs(lo), not runs(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runs(mid) is None else (lo, mid)
    return dataclasses.replace(space, seq=(space.seq[0], lo))


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
