"""Lent weights: during compile() the graph reads the user's own tensors instead of copies.

A copy of every weight at capture doubled compile's memory (513 MiB more for SmolLM2-135M, 28 GB
for a 7B model in fp32), and most of it was thrown away again as the precision pass replaced the
weights it packed. So compile() captures with `lend(gm)`: every parameter, buffer and constant of
the graph module is a new tensor object over the *same storage* as the model's (its own
`requires_grad`, so training flags never reach the user's model). The rule that keeps this safe:
no pass writes into a weight's storage. A pass that changes a weight puts a new tensor in its
place (`replace_tensor`), which leaves the user's storage alone.

At the end `Lent.settle(gm)` copies the tensors the graph still shares with the model (the ones no
rule replaced: embeddings, norms, kept linears), so the CompiledModel owns all of its weights, and
checks through the version counters the aliases share with the model's tensors that nothing was
written in place (a pass that did is a bug; it is named).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Lent", "lend", "own_copies", "put_tensor", "replace_tensor", "tensor_slots"]


@dataclass
class Lent:
    """What `lend` handed the graph: each lent alias (name, tensor, the version it had)."""

    versions: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)
    # Buffers the forward writes (a call counter, running statistics), by name: the graph's own
    # copies from capture on, with the values they had then, put back at `settle` so that the
    # compiled model starts as the user's model is, not as compile's calibration forwards left it.
    written: dict[str, torch.Tensor] = field(default_factory=dict)
    # The user's own tensor behind each of those (the lent alias, its storage): a pass that calls
    # the user's model (`heal … distill=true`'s teacher, `generate=`) moves it, and
    # `give_back_written` puts the value it had at capture back.
    lender_written: dict[str, torch.Tensor] = field(default_factory=dict)

    def own_written(self, gm: nn.Module, names: list[str]) -> None:
        """Give `gm` its own copy of each named tensor the forward writes, remembering its value."""
        for name in names:
            tensor = _tensor_at(gm, name)
            self.written[name] = tensor.detach().clone()
            self.lender_written[name] = tensor
            replace_tensor(gm, tensor, tensor.detach().clone())
        # No longer lent: the user's model moving it (called as a teacher) is no pass's write.
        owned = {id(t) for t in self.lender_written.values()}
        self.versions = [v for v in self.versions if id(v[1]) not in owned]

    def give_back_written(self) -> None:
        """Put each buffer the forward writes back into the user's model as it was at capture (a
        pass that called the user's model moved it: a call counter, running statistics)."""
        with torch.no_grad():
            for name, tensor in self.lender_written.items():
                start = self.written.get(name)
                if start is not None and not torch.equal(tensor, start):
                    tensor.copy_(start)

    def check(self) -> None:
        """Raise if any lent tensor was written in place (its shared version counter moved)."""
        written = [name for name, t, v in self.versions if t._version != v]
        if written:
            raise RuntimeError(f"slimfx bug: a pass wrote in place into {len(written)} weight(s) it had "
                               f"borrowed from your model ({', '.join(written[:4])}"
                               f"{', …' if len(written) > 4 else ''}); please report it")

    def settle(self, gm: nn.Module) -> int:
        """Check nothing lent was written, then give `gm` its own copy of every tensor that still
        shares storage with the lender. Returns the bytes copied."""
        self.check()
        lent = {_storage(t) for _, t, _ in self.versions}
        copied = _replace_all(gm, lambda t: _storage(t) in lent, lambda t: t.detach().clone())
        self.versions.clear()
        with torch.no_grad():
            for name, start in self.written.items():
                tensor = _tensor_at(gm, name, missing_ok=True)  # gone with a removed block
                if tensor is not None and tensor.shape == start.shape:
                    tensor.copy_(start)
        self.written.clear()
        return copied


def lend(gm: nn.Module) -> Lent:
    """Make every tensor of `gm` a new object over the same storage (aliases stay aliases)."""
    lent = Lent()
    # detach() shares storage and the version counter with `t`
    _replace_all(gm, lambda t: True, lambda t: t.detach(), record=lent.versions)
    return lent


def own_copies(gm: nn.Module) -> int:
    """Replace every tensor of `gm` by a copy (aliases stay aliases). Returns the bytes copied."""
    return _replace_all(gm, lambda t: True, lambda t: t.detach().clone())


def tensor_slots(gm: nn.Module, tensor: torch.Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) of `gm` holding this very tensor object (tied weights: several)."""
    return [(mod, name) for mod in gm.modules() for name, t in _tensors_of(mod) if t is tensor]


def replace_tensor(gm: nn.Module, old: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Put a new tensor holding `values` wherever `gm` holds `old` (a Parameter stays a Parameter
    with the same requires_grad); `old` and its storage are not written. Returns the new tensor."""
    data = values.detach().to(old.dtype)
    new = nn.Parameter(data, old.requires_grad) if isinstance(old, nn.Parameter) else data
    put_tensor(gm, old, new)
    return new


def put_tensor(gm: nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put the tensor object `new` wherever `gm` holds `old`."""
    slots = tensor_slots(gm, old)
    if not slots:
        raise KeyError("the tensor to replace is not held by the module")
    for mod, name in slots:
        _set(mod, name, new)


# ---- helpers -----------------------------------------------------------------------------------


def _tensor_at(gm: nn.Module, name: str, missing_ok: bool = False) -> torch.Tensor | None:
    owner, _, attr = name.rpartition(".")
    try:
        tensor = getattr(gm.get_submodule(owner), attr)
    except AttributeError:
        if missing_ok:
            return None
        raise
    return tensor if isinstance(tensor, torch.Tensor) else None


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors_of(mod: nn.Module):
    yield from ((k, v) for k, v in mod._parameters.items() if v is not None)
    yield from ((k, v) for k, v in mod._buffers.items() if v is not None)
    # constants unlifted as plain attributes
    yield from ((k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor))


def _set(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in mod._parameters:
        mod._parameters[name] = value
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def _replace_all(gm: nn.Module, which, make, record: list | None = None) -> int:
    """Replace each tensor `which` picks by `make(t)` (a Parameter stays a Parameter); one new
    tensor per old object, so aliases stay aliases. Returns the bytes of the tensors replaced."""
    done: dict[int, torch.Tensor] = {}
    nbytes = 0
    for prefix, mod in gm.named_modules(remove_duplicate=False):
        for name, t in list(_tensors_of(mod)):
            if id(t) not in done:
                if not which(t):
                    continue
                data = make(t)
                done[id(t)] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
                nbytes += t.numel() * t.element_size()
                if record is not None:
                    record.append((f"{prefix}.{name}" if prefix else name, data, data._version))
            _set(mod, name, done[id(t)])
    return nbytes
