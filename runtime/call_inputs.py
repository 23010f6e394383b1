"""How a graph takes a call of the original model: inputs by position (named as the original
forward names them) or by name, flags it was captured with, ranks, dtypes cast as the model takes
them (a bool or int32 mask), omitted inputs filled, and [batch, seq] inputs that agree in size.
A compiled model's call and compile's calibration batches both go through it, so each bad input
is the same message in both places, never an error from inside the graph."""
from __future__ import annotations

from typing import Any

import torch

from .inputs import complete_inputs
from .program import Program

__all__ = ["CallInputs"]


# Why capture found an input a call may not leave out (InputInfo.fill, passes/capture_checks.py).
_NOT_FILLED = {
    "position_ids": "the model numbers positions its own way, not 0, 1, 2, … as a filled one would",
    "token_type_ids": "the model computes otherwise with them left out than with zeros (GPT-2 adds no type "
                      "embedding without them)",
    "": "the model computes otherwise with it left out than filled in",
}


class CallInputs:
    """`CallInputs(program, "compiled LlamaForCausalLM").bind(args, kwargs)`: the inputs by name;
    `what` begins every error message."""

    def __init__(self, graph: Program, what: str, fix: str = "recompile with other example_inputs to change them"):
        self.graph, self.what, self.fix = graph, what, fix  # fix: what to do about missing or extra inputs
        self.names = tuple(i.name for i in graph.inputs)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The graph's inputs by name, in its order, from a call of the original model."""
        names = self.names
        bound, by_position = self._by_position(args)
        twice_flags = [n for n in by_position if n in kwargs]
        if twice_flags:
            raise TypeError(f"{self.what}: {twice_flags[0]} is given by position and by name")
        kwargs = {**kwargs, **by_position}  # flags by position are checked as by name
        self._no_flag_left_out(kwargs)
        kwargs = self._without_flags(kwargs)
        twice = [n for n in kwargs if n in bound]
        bound.update(kwargs)
        for info in self.graph.inputs:  # before filling omitted inputs, which sizes them from these
            value = bound.get(info.name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise self._not_a_tensor(info, value)
        self._check_ranks(bound)
        self._check_fixed_sizes(bound)
        bound = self._cast_inputs(bound)
        bound = complete_inputs(bound, self.graph.inputs)  # e.g. attention_mask omitted: all ones
        missing = [n for n in names if n not in bound]
        extra = [n for n in bound if n not in names]
        if missing or extra or twice:
            raise TypeError(
                f"{self.what} takes inputs {list(names)} (by position or name); "
                + "; ".join(f"{label} {items}" for label, items in
                            (("missing", missing), ("unexpected", extra),
                             ("given twice", twice)) if items)
                + f". The compiled graph was captured with exactly these tensor inputs: {self.fix}"
                + "".join(f" ({i.name} is not filled in when left out: {_NOT_FILLED.get(i.name, _NOT_FILLED[''])}; "
                          "give it, or capture without it)"
                          for i in self.graph.inputs if i.name in missing and not i.fill))
        self._check_values(bound)
        return self._rows_for_every_row({n: bound[n] for n in names})

    def _rows_for_every_row(self, bound: dict) -> dict:
        """A [1, seq] input beside [batch, seq] ones stands for every row: the original model
        broadcasts position_ids of one row, and skips a one-row mask of ones (it refuses a padded
        one, which here applies to every row). The graph takes one row per row (it indexed past
        the single row, an IndexError)."""
        token_shaped = [i.name for i in self.graph.inputs if i.dims.get(0) == "batch" and i.dims.get(1) == "seq"
                        and bound[i.name].dim() >= 2]
        rows = max((bound[n].shape[0] for n in token_shaped), default=1)
        return {n: v.expand(rows, *v.shape[1:]) if n in token_shaped and v.shape[0] == 1 and rows > 1 else v
                for n, v in bound.items()}

    def _check_values(self, bound: dict) -> None:
        """Each input a tensor, and the token-shaped ones [batch, seq] of one size with at least one
        token: inside the graph these were an AttributeError on None, a guard's AssertionError or
        a reshape of 0 elements."""
        sized, seq_symbol = {}, {}
        for info in self.graph.inputs:
            value = bound[info.name]
            if not isinstance(value, torch.Tensor):
                raise self._not_a_tensor(info, value)
            over = [(d, most) for d, most in info.limits.items() if d < value.dim() and value.shape[d] > most]
            for d, most in over:  # a loaded artifact has no export guard to say it
                raise ValueError(f"{self.what} does not take inputs of these sizes: {info.name} {list(value.shape)} "
                                 f"has {value.shape[d]} in dim {d} ({info.dims.get(d, 'a dim')}), at most {most} — the "
                                 "graph keeps the limits of the model it was captured from (e.g. its number of positions)")
            if info.dims.get(0) == "batch" and info.dims.get(1) == "seq" and value.dim() >= 2:
                sized[info.name] = tuple(value.shape[:2])
                seq_symbol[info.name] = str(info.shape[1])
        shapes = set(sized.values())
        # A batch of 1 may stand for every row (position_ids [1, seq], as Hugging Face takes them).
        if _seq_lengths_disagree(sized, seq_symbol) or len({s[0] for s in shapes} - {1}) > 1:
            raise ValueError(f"{self.what}: inputs of [batch, seq] disagree in size: "
                             + ", ".join(f"{n} {list(s)}" for n, s in sized.items()))
        if any(0 in s for s in shapes):
            name, shape = next(iter(sized.items()))
            raise ValueError(f"{self.what}: {name} is {list(shape)}, with no tokens (or no rows) to run on")

    def _not_a_tensor(self, info, value) -> TypeError:
        array_like = hasattr(value, "__array__") or isinstance(value, (list, tuple))
        hint = " (torch.as_tensor(...) makes one)" if array_like else ""
        return TypeError(f"{self.what}: {info.name} is {type(value).__name__}, the graph takes a tensor "
                         f"[{_dims(info)}] of {info.dtype}{hint}")

    def _by_position(self, args: tuple) -> tuple[dict, list[str]]:
        """Inputs given by position, named as the original forward names its parameters: the
        graph's inputs are in the example's order (a BERT example of ids, token_type_ids, mask
        made `cm(ids, mask)` pass the mask as token_type_ids). A position the graph has no input
        for may be None, as the original model allows; a tensor there is refused by name."""
        order = self.graph.call.positional or self.names  # () from artifacts of before 2026-12-05
        if len(args) > len(order):
            raise TypeError(f"{self.what} takes {len(order)} inputs by position {list(order)}; "
                            f"{len(args)} were given")
        bound, flags = {}, {}  # flags: non-tensor values by position (`cm(x, 3, True)`), checked by name
        for i, (name, value) in enumerate(zip(order, args)):
            if name in self.names:
                bound[name] = value
            elif value is not None and not isinstance(value, torch.Tensor):
                flags[name] = value
            elif value is not None:
                raise TypeError(f"{self.what}: position {i} is the original forward's `{name}`, which the "
                                f"graph was not captured with (its inputs: {list(self.names)}); pass "
                                "inputs by name, or recompile with it in example_inputs")
        return bound, flags

    def _no_flag_left_out(self, given) -> None:
        """A flag the example set away from forward's own default, left out of a call, means the
        default there, which the graph does not compute: `cm(x)` after example (x, 3, True) ran
        with k=3, flag=True, silently, where the model's own call used k=1, flag=False."""
        flags = dict(self.graph.call.flags)
        for name, default in self.graph.call.declared:
            if name not in given:
                raise TypeError(f"{self.what} was captured with {name}={flags[name]!r}, and a call that leaves "
                                f"{name} out means {name}={default!r} (the forward's default, or its model config's), "
                                f"which the graph does not compute: pass {name}={flags[name]!r}, or compile with "
                                f"example_inputs that leave {name} out")

    def _without_flags(self, kwargs: dict) -> dict:
        """Non-tensor keyword inputs (use_cache=False, return_dict=True) are part of the graph: one
        it was captured with may be repeated; another value, or one it was not captured with, is
        refused with how to get a graph for it (recompiling with other tensors does not)."""
        fixed = dict(self.graph.call.flags)
        defaults = dict(self.graph.call.defaults)  # what the graph did for flags left out
        out = {}
        for name, value in kwargs.items():
            if name in self.names or isinstance(value, torch.Tensor):
                out[name] = value
            elif name in fixed and _same_flag(fixed[name], value):
                continue
            elif name not in fixed and value is None:  # the model's default, as HF callers pass it
                continue
            elif name not in fixed and name in defaults and _same_flag(defaults[name], value):
                continue
            elif name == "use_cache" and value is False:  # what every graph computes (a forward taking it by **kwargs)
                continue
            elif name == "use_cache":
                raise TypeError(f"{self.what} runs without a KV cache: use_cache={value!r} is not supported "
                                "(leave it out, or pass use_cache=False; a generation loop feeds the whole sequence)")
            elif name in fixed:
                raise TypeError(f"{self.what} was captured with {name}={fixed[name]!r}, which the graph has fixed; "
                                f"{name}={value!r} needs another graph: compile with example_inputs that "
                                f"include {name}={value!r}")
            else:
                was = f"with {name}={defaults[name]!r}" if name in defaults else f"without {name}"
                raise TypeError(f"{self.what} was captured {was} (the model's default), which the "
                                f"graph has fixed; to call it with {name}={value!r}, compile with example_inputs "
                                f"that include {name}={value!r}")
        return out

    def _check_ranks(self, given: dict) -> None:
        """A tensor of another rank than its graph input is refused by name: 1-D input_ids were
        reported as a missing attention_mask (none could be sized from them)."""
        for info in self.graph.inputs:
            value = given.get(info.name)
            if isinstance(value, torch.Tensor) and value.dim() != len(info.shape):
                hint = (f"; add the batch dimension, e.g. {info.name}.unsqueeze(0)"
                        if value.dim() + 1 == len(info.shape) else "")
                raise TypeError(f"{self.what}: {info.name} is {value.dim()}-D {list(value.shape)}, the graph "
                                f"takes it {len(info.shape)}-D [{_dims(info)}]{hint}")

    def _check_fixed_sizes(self, given: dict) -> None:
        """A dim the capture fixed (a ViT's image side, a feature width) must be the traced size:
        another one was the graph's own guard, a bare AssertionError ("Guard failed:
        pixel_values.size()[2] == 32"), from a call or from inside a calibrating pass."""
        for info in self.graph.inputs:
            value = given.get(info.name)
            if not isinstance(value, torch.Tensor):
                continue
            wrong = [d for d, n in enumerate(info.shape) if isinstance(n, int) and value.shape[d] != n]
            if wrong:
                which = f"{'dim' if len(wrong) == 1 else 'dims'} {', '.join(map(str, wrong))}"
                raise ValueError(f"{self.what}: {info.name} is {list(value.shape)}, the graph takes "
                                 f"[{_dims(info)}]: {which} "
                                 f"{'was' if len(wrong) == 1 else 'were'} fixed at capture by the example inputs "
                                 "(only the named dims vary); resize the input, or compile "
                                 "with example_inputs of this size")

    def _cast_inputs(self, given: dict) -> dict:
        """Inputs of another dtype than the graph's, as the original model takes them: a bool,
        int32 or 0/1 float attention_mask, int32 input_ids (export baked in the example's dtype, and
        the graph's own dtype check raised a bare "Tensor dtype mismatch"). Integer values go to
        integer inputs only when they are whole numbers; floats go to float inputs."""
        out = dict(given)
        for info in self.graph.inputs:
            value = given.get(info.name)
            if not isinstance(value, torch.Tensor) or value.dtype == info.dtype:
                continue
            to_float = info.dtype.is_floating_point
            if not to_float and value.is_floating_point() and not torch.equal(value, value.round()):
                raise TypeError(f"{self.what}: {info.name} is {value.dtype} with values that are not whole "
                                f"numbers; the graph takes {info.dtype} (a mask of 0 and 1, or token ids)")
            if to_float and value.is_complex():
                raise TypeError(f"{self.what}: {info.name} is {value.dtype}; the graph takes {info.dtype}")
            out[info.name] = value.to(info.dtype)
        return out


def _seq_lengths_disagree(sized: dict, seq_symbol: dict) -> bool:
    """Do inputs that share a traced sequence dim differ in length? Only those the graph traced
    with one symbol must agree: T5's decoder_input_ids or a second id input (`cats` [B, 3]
    beside input_ids [B, 8]) has a length of its own, and comparing all of them refused every
    call of such a graph, the example's included."""
    lengths: dict[str, set] = {}
    for name, (_, length) in sized.items():
        lengths.setdefault(seq_symbol[name], set()).add(length)
    return any(len(v) > 1 for v in lengths.values())


def _dims(info) -> str:
    """An input's shape as the graph takes it: `batch, seq` for its dynamic dims, numbers else."""
    return ", ".join(info.dims.get(d, str(n)) for d, n in enumerate(info.shape))


def _same_flag(fixed: Any, given: Any) -> bool:
    """Equal and of the same type, inside tuples and lists too (`fill=(1,)` took `(True,)` and
    `(1.0,)`, where a scalar flag of 1 takes neither)."""
    if isinstance(fixed, (tuple, list)):
        return (type(fixed) is type(given) and len(fixed) == len(given)
                and all(_same_flag(f, g) for f, g in zip(fixed, given)))
    try:
        return type(fixed) is type(given) and bool(fixed == given)
    except Exception:  # a value whose == raises or is not a bool
        return False
