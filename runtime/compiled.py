"""CompiledModel: what `slimfx.compile` returns and `slimfx.load` restores — the last stage.

It wraps the rewritten Program (runtime/program.py) as an nn.Module that is called like the original model and
owns the graph's (possibly packed) weights, so `.parameters()` and `.state_dict()` show them.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from .call_inputs import CallInputs
from .program import Program, devices_named
from .report import Report

__all__ = ["CompiledModel"]


class CompiledModel(nn.Module):
    """A compiled model: call it like the original, read `.report`, `.save(dir)` it.

    >>> cm = CompiledModel(capture(llama, {"input_ids": ids, "attention_mask": mask}),
    ...                    report=Report(None, "LlamaForCausalLM"))
    >>> type(cm(input_ids=ids, attention_mask=mask)).__name__     # the model's own output class
    'CausalLMOutputWithPast'
    >>> cm.save(tmp / "llama")
    >>> torch.equal(slimfx.load(tmp / "llama")(ids, mask).logits, cm(ids, mask).logits)
    True

    The graph's GraphModule is the child `program`: its weights are this module's weights
    (state-dict keys `program.<original name>`), and `.to(device)` moves them.
    """

    def __init__(self, graph: Program, *, report: Report, policy_text: str = "",
                 policy_name: str | None = None, backend: str = "auto"):
        super().__init__()
        self.program = graph.module  # registered child: parameters/state_dict see its weights
        self.graph = graph  # not a Module, so nn.Module keeps it as a plain attribute
        self.report = report
        self.policy_text = policy_text
        self.policy_name = policy_name
        self.train(False)
        # Compiled weights are frozen, as a compressed model's base weights are (QLoRA-style
        # adapters train beside them): a call outside torch.no_grad() then still takes the fast
        # CPU kernels, which step aside for the reference op only when a gradient is needed.
        # Adapter parameters (runtime/adapters.py) are the exception: they are what trains.
        self.program.requires_grad_(False)
        for p in self.adapter_parameters():
            p.requires_grad_(True)
        self.set_backend(backend)
        self.register_load_state_dict_post_hook(_reconvert)

    # ---- lowering (runtime/lower.py) ----
    def set_backend(self, backend: str = "auto") -> "CompiledModel":
        """Lower the graph once for `backend`: "auto" runs each quantized linear a CPU kernel takes
        through it (bf16 activations), "eager" runs the reference ops only. Never per call."""
        from .adapters import set_dropout
        from .lower import lower

        # Kernels are generated from the eval graph (no adapter dropout, no DoRA training term):
        # lowered in training mode, they kept W·(dropout(x) − x) = 0 in every eval call after.
        set_dropout(self.program, False)
        try:
            lower(self.program, backend)
        finally:
            set_dropout(self.program, self.training)
        self.backend = backend
        return self

    @property
    def lowering(self):
        """Which quantized linears run through which kernel (a runtime/lower.py `Lowering`)."""
        from .lower import summary

        return summary(self.program)

    # ---- calling ----
    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.graph.inputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph on the original model's inputs; return the original output structure."""
        flat = self._bind(args, kwargs)
        self._check_autocast(flat)
        if self._needs_reference(flat):
            # Generated Triton kernels have no backward and no dropout: a call that builds an
            # autograd graph (a plain call outside no_grad, adapters being trainable) or that
            # drops adapter inputs (train mode) runs the reference graph, as the CPU kernels step
            # aside for their reference op; the kernels stay installed.
            from .lower import unlowered

            with unlowered(self.program):
                out = self._run(flat)
        else:
            from .graph_access import reading

            with reading(self.program):  # a save or copy in another thread waits for this call
                out = self._run(flat)
        own = sum(self.graph.outputs.tensor_leaves)
        if len(out) > own:  # token rules with restore=false add (positions, sizes) after the model's own
            self._kept_tokens = {"positions": out[own], "sizes": out[own + 1]}
        return self.graph.restructure(out[:own])

    def _check_autocast(self, flat: list) -> None:
        """A half model under autocast to the other half dtype: the captured graph checks its
        values' dtypes (export's metadata asserts), which autocast changes, and raised a bare
        "Tensor dtype mismatch". An fp32 model, or the model's own dtype, runs under autocast."""
        device = next((v.device.type for v in flat if isinstance(v, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(device):
            return
        mine, theirs = self.dtype, torch.get_autocast_dtype(device)
        if mine in (torch.float16, torch.bfloat16) and theirs != mine:
            raise TypeError(f"{self._what()} computes in {mine}, and the call is under torch.autocast to {theirs}: "
                            f"call it outside autocast (or with dtype={mine}), or compile the model cast to {theirs}")

    def _run(self, flat: list) -> tuple:
        try:
            return tuple(self.program(*flat))
        except AssertionError as e:  # export's guards on the inputs: sizes the graph does not take
            if not str(e).startswith("Guard failed"):
                raise
            raise ValueError(f"{self._what()} does not take inputs of these sizes ({self._sizes(flat)}): {e} — the graph keeps "
                             "the limits of the model it was captured from (e.g. its number of positions)") from None
        except IndexError as e:  # an embedding lookup past its table: GPT-2's positions, any model's vocabulary
            if "out of range" not in str(e):
                raise
            raise ValueError(f"{self._what()}: an index is past the end of one of its embedding tables "
                             f"({_tables(self.program)}) with inputs {self._sizes(flat)}: give no more tokens than the model "
                             "has positions, and token ids below its vocabulary size") from None
        except RuntimeError as e:
            # A model that changes autocast around some op in a way capture does not keep (a region
            # that turns it off around other ops than the matmuls passes/autocast_regions.py keeps):
            # under the caller's autocast the op runs in half, and the graph's dtype checks raised a
            # bare "Tensor dtype mismatch" at every call.
            device = next((v.device.type for v in flat if isinstance(v, torch.Tensor)), "cpu")
            if "dtype mismatch" not in str(e) or not torch.is_autocast_enabled(device):
                raise
            raise TypeError(f"{self._what()} cannot run under torch.autocast: an op of the captured graph met another "
                            f"dtype than at capture ({e}). The model's own code casts there in a way the graph, traced "
                            "outside autocast, does not keep: a `.float()` on a linear's output (Gemma2's norms), a "
                            "no-op at capture and a half value under autocast, or a change of autocast around some op. "
                            "Call it outside autocast (its weights and kernels keep the precision compile gave them)"
                            ) from None

    def _sizes(self, flat: list) -> str:
        return ", ".join(f"{n} {list(v.shape)}" for n, v in zip(self.input_names, flat) if isinstance(v, torch.Tensor))

    def _needs_reference(self, flat: list) -> bool:
        if getattr(self.program, "_slimfx_triton", None) is None:
            return False
        if self.training:
            from .adapters import dropout_active

            if dropout_active(self.program):
                return True
        if not torch.is_grad_enabled():
            return False
        return any(p.requires_grad for p in self.program.parameters()) or \
            any(isinstance(v, torch.Tensor) and v.requires_grad for v in flat)

    @property
    def kept_tokens(self) -> dict[str, torch.Tensor] | None:
        """After a call of a model compiled with `tokens after … restore=false`: which tokens its
        shorter outputs hold. "positions" [B, L']: each slot's position in the input (−1 at
        padding); "sizes" [B, L']: how many input tokens it holds (merged ones more than 1, 0 at
        padding). None before the first call and for models that keep the sequence length."""
        return getattr(self, "_kept_tokens", None)

    def _bind(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        bound = CallInputs(self.graph, self._what()).bind(args, kwargs)
        return [bound[n] for n in self.input_names]

    def _what(self) -> str:
        return f"compiled {self.graph.model_class}"

    # ---- copies ----
    def __deepcopy__(self, memo) -> "CompiledModel":
        """An independent copy (its own tensors; the same backend and mode): nn.Module's deepcopy
        reached export's fake tensors and failed."""
        from .program_copy import copy_program

        copy = CompiledModel(copy_program(self.graph), report=self.report, policy_text=self.policy_text,
                             policy_name=self.policy_name, backend=self.backend)
        memo[id(self)] = copy
        return copy.train(self.training)

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{self._what()} is not pickled (torch.save(cm) or pickle): save it with cm.save(dir), "
                        "which writes JSON and safetensors only, and read it back with slimfx.load(dir); "
                        "copy.deepcopy(cm) copies it in memory")

    # ---- dtype: fixed at compile time ----
    # The graph was captured in the model's dtype, and packed weights keep their own (fp16
    # scales beside uint8 codes): nn.Module's casts would turn those into something no op reads.
    def to(self, *args: Any, **kwargs: Any) -> "CompiledModel":
        """Move to a device (`.to("cuda")`); a dtype other than the model's own is refused (see
        `half()`); its own (`model.to(device, torch.float32)` on a float32 model) changes nothing."""
        device, dtype, non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self._refuse_cast(f".to({dtype})", dtype)
            return super().to(device, non_blocking=non_blocking) if device is not None else self
        return super().to(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        """Every cast and move of nn.Module ends here, a parent module's too (`nn.Sequential(cm)
        .half()` went past the overrides above: the fp16 scales and fp32 weights were cast, every
        call then failed, and casting back left the scales in fp32). A cast to another dtype than
        the model's own is refused before any tensor changes; a move, or a cast to its own dtype,
        keeps each tensor's dtype (packed fp16 scales stay fp16 under a parent's `.float()`)."""
        mine = self.dtype
        probe = fn(torch.empty(0, dtype=mine or torch.float32))
        if mine is not None and isinstance(probe, torch.Tensor) and probe.dtype != mine:
            self._refuse_cast(f": a cast to {probe.dtype} (by a module that holds it)", probe.dtype)
        if isinstance(probe, torch.Tensor):
            self._refuse_move(probe.device)

        def keeping_dtype(t):
            out = fn(t)
            return out.to(t.dtype) if isinstance(out, torch.Tensor) and out.dtype != t.dtype else out

        return super()._apply(keeping_dtype, recurse)

    def half(self) -> "CompiledModel":
        return self._refuse_cast(".half()", torch.float16)

    def bfloat16(self) -> "CompiledModel":
        return self._refuse_cast(".bfloat16()", torch.bfloat16)

    def float(self) -> "CompiledModel":
        return self._refuse_cast(".float()", torch.float32)

    def double(self) -> "CompiledModel":
        return self._refuse_cast(".double()", torch.float64)

    def type(self, dst_type) -> "CompiledModel":
        return self._refuse_cast(f".type({dst_type})", dst_type if isinstance(dst_type, torch.dtype) else None)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype the model computes in: that of its first floating-point output (logits,
        last_hidden_state) that is not a scalar, as the graph was captured; None for a graph
        without one. Not a scalar: a loss comes first (`labels` given), and Hugging Face computes
        it in float32 whatever the model's dtype (a bf16 model read as float32, and its own
        dtype was refused by .bfloat16())."""
        out = next(n for n in reversed(self.graph.module.graph.nodes) if n.op == "output")  # the last node
        vals = [node.meta.get("val") for node in _flat_nodes(out.args)]
        floats = [v for v in vals if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return min(floats, key=lambda v: v.dim() == 0).dtype if floats else None

    def _refuse_move(self, device: torch.device) -> None:
        """The captured graph names its device (aten.arange(device=cpu), the dtype/device checks
        export writes): moved elsewhere, every call failed inside the generated code. A graph
        that names none moves freely."""
        named = devices_named(self.program)
        other = sorted({str(d) for d in named if d.type != device.type
                        or None not in (d.index, device.index) and d.index != device.index})
        if other and device.type == "meta":  # a model on meta has no values to compile: no advice to do so
            raise RuntimeError(f"{self._what()} was compiled on {', '.join(other)}, and its graph makes and checks "
                               "tensors there: it cannot move to meta (to free its memory, delete it)")
        if other:
            raise RuntimeError(f"{self._what()} was compiled on {', '.join(other)}, and its graph makes and checks "
                               f"tensors there: it cannot move to {device}. Move the original model there "
                               f"(model.to({str(device)!r})) and compile that")

    def _refuse_cast(self, call: str, dtype: torch.dtype | None) -> "CompiledModel":
        """A cast to the model's own dtype is no change; any other is refused."""
        if dtype is not None and dtype == self.dtype:
            return self
        raise TypeError(f"{self._what()}{call}: a compiled model keeps the dtypes it was compiled in; cast the "
                        "original model (e.g. model.to(torch.bfloat16)) and compile that")

    def train(self, mode: bool = True) -> "CompiledModel":
        """Training mode switches the adapters' dropout on; the rest of the graph was captured in
        eval mode (no dropout of the model's own) and stays so."""
        from .adapters import set_dropout

        for m in self.modules():
            m.training = mode
        set_dropout(self.program, mode)
        return self

    # ---- adapters (runtime/adapters.py) ----
    @property
    def adapters(self):
        """target path -> `Adapter` (method, rank, alpha, dropout) for every adapter in the graph."""
        from .adapters import adapters_of

        return adapters_of(self.program)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapters' parameters (lora_A, lora_B, lora_magnitude): what an optimizer trains."""
        from .adapters import is_adapter_param

        return [p for n, p in self.program.named_parameters() if is_adapter_param(n)]

    def merge_adapters(self) -> "CompiledModel":
        """A new CompiledModel with every adapter folded into its float base weight (fp32, or the
        fp16/bf16 weight of a half model: folded in float32, rounded once; no adapter ops left);
        this one is unchanged. Refused (MergeError, before any change) for an adapter over a
        quantized, precision-rule-stored or tied weight."""
        from .adapter_merge import merge_adapters, merged_report
        from .program_copy import copy_program

        start, adapters, params = time.perf_counter(), self.adapters, self.adapter_parameters()
        program = copy_program(self.graph)
        merge_adapters(program)
        report = merged_report(self.report, adapters, params, time.perf_counter() - start)
        return CompiledModel(program, report=report, policy_text=self.policy_text,
                             policy_name=self.policy_name, backend=self.backend)

    def save_adapters(self, path: str | os.PathLike) -> None:
        """Write the adapters in PEFT's format (adapter_config.json, adapter_model.safetensors):
        `peft.PeftModel.from_pretrained(original_model, path)` loads them."""
        from .peft_format import save_adapters

        save_adapters(self, path)

    # ---- saving ----
    def save(self, path: str | os.PathLike) -> None:
        """Write the artifact directory `path` atomically (see runtime/artifact.py)."""
        from .artifact import save  # artifact imports this module: import it on use

        save(self, path)

    # ---- reading ----
    def weight_bytes(self) -> int:
        """Bytes of every distinct parameter, buffer and tensor constant (aliases once); the
        weights converted for CPU kernels are not counted (`self.lowering.extra_bytes`)."""
        from .lower import lowered_tensors

        converted = {id(t) for t in lowered_tensors(self.program)}
        seen: dict[tuple, int] = {}
        for t in _tensors(self.program):
            if id(t) in converted:
                continue
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = (
                t.numel() * t.element_size())
        return sum(seen.values())

    def __repr__(self) -> str:
        policy = self.policy_name or "(empty policy)"
        lowering = self.lowering
        kernels = f", {lowering}" if lowering.lowered else ""
        return (f"CompiledModel({self.graph.model_class}, policy {policy}, "
                f"inputs {list(self.input_names)}, {_mib(self.weight_bytes())} of weights{kernels})")


def _reconvert(cm: "CompiledModel", _incompatible) -> None:
    """After load_state_dict: it copies into the packed weights in place, and the CPU kernels'
    converted copies of them (runtime/lower.py, not in the state dict) were made from the old
    ones — the model ran the old weights' kernels beside the new ones' reference values. Lowered
    again from the reference graph, they are converted from what was loaded."""
    from .lower import lower, lowered_tensors

    if lowered_tensors(cm.program):
        lower(cm.program, "eager")
        lower(cm.program, cm.backend)


def _flat_nodes(args) -> list:
    """The fx nodes in a (nested) output argument, in order."""
    found: list = []
    torch.fx.node.map_arg(args, found.append)
    return found


def _tensors(module: nn.Module):
    """Parameters, buffers and plain tensor attributes (constants an export left unlifted)."""
    yield from module.parameters()
    yield from module.buffers()
    for mod in module.modules():
        yield from (v for v in vars(mod).values() if isinstance(v, torch.Tensor))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _tables(module: torch.nn.Module) -> str:
    """`transformer.wpe` 128 rows, … : the tables the graph's embedding lookups read."""
    names = [n.args[0].target for n in module.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.aten.embedding.default
             and getattr(n.args[0], "op", None) == "get_attr"]
    rows = []
    for name in dict.fromkeys(names):
        owner, _, attr = name.rpartition(".")
        table = getattr(module.get_submodule(owner), attr)
        rows.append(f"{name.removesuffix('.weight')} holds {table.shape[0]:,} rows")
    return "; ".join(rows) or "none found"
