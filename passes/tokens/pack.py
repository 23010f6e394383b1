"""The graph rewrite behind `tokens unpad`: from the residual stream entering the first block on,
every value with a sequence dim holds the real tokens only ([B, S, …] becomes [1, N, …]).

Packedness flows forward from that point. A node that reads a packed value is rewritten to
compute on the packed form when its op treats positions independently (pointwise ops, linears,
norms and reductions over other dims, views, slices and concatenations along other dims);
attention becomes `slimfx::packed_attention` (each sequence among itself, with its rows and
columns of the original mask); an operand with a sequence dim that is not packed yet (a rotary
table, a position embedding) is packed where it is read. Any other op gets its packed inputs
scattered back to the padded layout first (`slimfx::unpack_tokens`: correct, only slower; the
report lists those nodes), and the graph's outputs are unpacked with zeros at padding positions.

Every node keeps its *logical* `meta["val"]` (the padded-layout shape); `meta["slimfx_packed"]`
records the Layout of a node whose runtime value is packed.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx

from ...runtime import ops as _quant_ops  # noqa: F401 - registers slimfx::quant_linear, matmul_without_autocast
from ...runtime import token_ops
from .layout import FLAT, NO_BATCH, Layout, Symbols
from ...runtime.forward_parts import recompile
from ..token_history import PACKED
from ..token_attention import SDPA

__all__ = ["pack_graph", "PackResult", "PACKED"]

aten = torch.ops.aten
_BIG = 2 ** 62

# Ops that move or retype a value without mixing positions: the output's layout is read off its
# value. squeeze is handled apart (it must not remove the batch or the sequence dim).
_LAYOUT_OPS = {
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.type_as.default,
    aten.dropout.default, aten.t.default, aten.lift_fresh_copy.default,
}
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
# Contractions with a weight: token-wise as long as no other operand has a batch or sequence dim.
# A quantized linear (`quantize` above the token rules) is one too: its packed weight has neither.
_WEIGHT_OPS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default,
               aten.bmm.default, aten.embedding.default, aten.conv1d.default,
               torch.ops.slimfx.quant_linear.default, torch.ops.slimfx.matmul_without_autocast.default}
# (op, position of the dim argument) for ops along one dim or a list of dims.
_DIM_OPS = {
    aten._softmax.default: 1, aten.softmax.int: 1, aten._log_softmax.default: 1, aten.log_softmax.int: 1,
    aten.mean.dim: 1, aten.sum.dim_IntList: 1, aten.amax.default: 1, aten.amin.default: 1,
    aten.var.correction: 1, aten.std.correction: 1, aten.any.dim: 1, aten.argmax.default: 1,
    aten.max.dim: 1, aten.min.dim: 1, aten.select.int: 1, aten.narrow.default: 1, aten.split.Tensor: 2,
    aten.split_with_sizes.default: 2, aten.chunk.default: 2, aten.unbind.int: 1, aten.squeeze.dim: 1,
    aten.squeeze.dims: 1, aten.cumsum.default: 1, aten.norm.ScalarOpt_dim: 2,
}
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
_NO_OUTPUT = {aten._assert_tensor_metadata.default}


class PackResult:
    def __init__(self):
        self.attention = 0  # attention nodes now per sequence
        self.packed_nodes = 0
        self.padded: list[str] = []  # ops that needed the padded layout ("aten.select.int")


def pack_graph(gm: fx.GraphModule, start: fx.Node, mask: Optional[fx.Node], symbols: Symbols) -> PackResult:
    """Rewrite `gm` in place so it computes on real tokens from `start` on; `mask` is the
    attention-mask placeholder ([B, S], nonzero at real tokens), or None when every token of
    `start` ([B, S, …]) is real (a ViT's patches)."""
    return _Packer(gm, start, mask, symbols).run()


class _Packer:
    def __init__(self, gm: fx.GraphModule, start: fx.Node, mask: fx.Node, symbols: Symbols):
        self.gm, self.g, self.start, self.mask, self.sym = gm, gm.graph, start, mask, symbols
        self.result = PackResult()
        self.packed: dict[fx.Node, Layout] = {}
        self.packs: dict[tuple[fx.Node, Layout], fx.Node] = {}
        self.unpacks: dict[tuple[fx.Node, tuple], fx.Node] = {}
        self.own: list[fx.Node] = []  # nodes made here that read `start` as it is (the all-real mask)

    # ---- the walk ----
    def run(self) -> PackResult:
        self._index_nodes()
        layout = self.sym.layout(self.start.meta.get("val"))
        if layout is None or layout.batch == NO_BATCH:
            raise ValueError(f"the residual stream {self.start.name} has no batch and sequence dims")
        later = list(self.g.nodes)
        at = {n: i for i, n in enumerate(later)}
        later = later[at[self.start] + 1:]
        with self.g.inserting_after(max(self.start, self.n, key=at.get)):
            first = self._pack_node(self.start, layout)
        if "nn_module_stack" in self.start.meta:  # the packed stream stays the output of what made it (a block)
            first.meta["nn_module_stack"] = self.start.meta["nn_module_stack"]
        own = {first, *self.own}
        self.start.replace_all_uses_with(first, delete_user_cb=lambda u: u not in own)
        for node in later:
            if node.op == "output":
                self._unpack_outputs(node)
            elif node.op == "call_function" and any(a in self.packed for a in node.all_input_nodes):
                if not self._rewrite(node):
                    self._to_padded(node)
        self.result.packed_nodes = len(self.packed)
        self.g.lint()
        recompile(self.gm)
        return self.result

    def _index_nodes(self) -> None:
        """token_index(mask) and the sizes the packed ops need, right after the mask input."""
        if self.mask is None:
            self.mask = self._all_real()
        with self.g.inserting_after(self.mask):
            index = self._call(token_ops.token_index, (self.mask,), None)
        with self.g.inserting_after(index):
            self.bi = self._call(operator.getitem, (index, 0), None)
        with self.g.inserting_after(self.bi):
            self.si = self._call(operator.getitem, (index, 1), None)
        with self.g.inserting_after(self.si):
            self.batch = self._call(aten.sym_size.int, (self.mask, 0), None)
        with self.g.inserting_after(self.batch):
            self.seq = self._call(aten.sym_size.int, (self.mask, 1), None)
        with self.g.inserting_after(self.seq):
            self.n = self._call(aten.sym_size.int, (self.bi, 0), None)
        flat = self.mask.meta["val"].flatten().long()  # logical value: at most B·S tokens
        index.meta["val"] = (flat, flat)
        self.bi.meta["val"] = self.si.meta["val"] = flat
        self.batch.meta["val"], self.seq.meta["val"] = self.mask.meta["val"].shape
        self.n.meta["val"] = flat.shape[0]

    def _all_real(self) -> fx.Node:
        """A [B, S] mask of ones shaped like `start` (every token real), right after it."""
        val = self.start.meta["val"]
        with self.g.inserting_after(self.start):
            batch = self._call(aten.sym_size.int, (self.start, 0), None)
        with self.g.inserting_after(batch):
            # the length read from `start` too: the example's symbol written into the graph was
            # defined nowhere (NameError at every call of a model that takes no attention_mask)
            seq = self._call(aten.sym_size.int, (self.start, 1), None)
        with self.g.inserting_after(seq):
            ones = self._call(aten.new_ones.default, (self.start, [batch, seq]), None, {"dtype": torch.long})
        self.own += [batch, seq, ones]
        batch.meta["val"], seq.meta["val"] = val.shape[0], val.shape[1]
        ones.meta["val"] = val.new_ones((val.shape[0], val.shape[1]), dtype=torch.long)
        return ones

    def _call(self, op, args, like: Optional[fx.Node], kwargs=None) -> fx.Node:
        node = self.g.call_function(op, tuple(args), kwargs or {})
        if like is not None and "nn_module_stack" in like.meta:
            node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
        return node

    # ---- packing and unpacking single values ----
    def _pack_node(self, value: fx.Node, layout: Layout, consumer: Optional[fx.Node] = None) -> fx.Node:
        """The packed form of `value` (inserted at the current insertion point), memoized."""
        key = (value, layout)
        if key not in self.packs:
            # The pack belongs where its value was made: with no module of its own it sat outside
            # every block, so a block's own value (a rotary model's cos.unsqueeze(1)) was read "after"
            # the block, and drop/collapse refused to remove it. Shared by several blocks, it stays outside.
            node = self._call(token_ops.pack_tokens, (value, self.bi, self.si, self.seq, layout.batch, layout.seq),
                              value)
            node.meta["val"] = value.meta["val"]
            if layout.batch != NO_BATCH:
                self.packed[node] = layout
                node.meta[PACKED] = layout
            self.packs[key] = node
        return self.packs[key]

    def _unpacked(self, value: fx.Node, before: fx.Node) -> fx.Node:
        """The padded form of `value` for its reader `before`, memoized per value and owner.

        The unpack lies in the modules that hold both the value and its reader: inside a block for
        a reader in that block, outside every block for a graph output or a pooler. Had it the
        value's modules, an output's unpack of a block's stream (output_hidden_states, or the last
        block's last_hidden_state) would be that block's last value read outside it: the block
        index would take the unpack for the block's output, the next block would not read it, and
        drop/collapse of the last block would see its packed stream read "after" it."""
        stack = _common_stack(value, before)
        key = (value, tuple(stack or {}))
        if key not in self.unpacks:
            layout = self.packed[value]
            with self.g.inserting_before(before):
                node = self._call(token_ops.unpack_tokens, (value, self.bi, self.si, self.batch, self.seq,
                                                            layout.batch, layout.seq), None)
            if stack:
                node.meta["nn_module_stack"] = stack
            node.meta["val"] = value.meta["val"]
            self.unpacks[key] = node
        return self.unpacks[key]

    def _to_padded(self, node: fx.Node) -> None:
        self.result.padded.append(str(node.target).replace("torch.ops.", ""))
        node.args, node.kwargs = fx.node.map_arg(
            (node.args, node.kwargs), lambda a: self._unpacked(a, node) if a in self.packed else a)

    def _unpack_outputs(self, out: fx.Node) -> None:
        out.args = fx.node.map_arg(out.args, lambda a: self._unpacked(a, out) if a in self.packed else a)

    # ---- one node ----
    def _rewrite(self, node: fx.Node) -> bool:
        """Make `node` compute on packed values; False when it cannot (then it gets padded ones)."""
        op = node.target
        val = node.meta.get("val")
        if op is operator.getitem:
            layout = self.sym.layout(val)
            return layout is None or self._mark(node, layout)  # an item without a sequence stays as it is
        if op in _NO_OUTPUT:
            # a size/stride check would name the padded shape; dtype and device still hold
            node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size", "stride")}
            return True
        if op is aten.sym_size.int:
            return self._sym_size(node)
        if op is SDPA:
            return self._attention(node)
        x = node.args[0] if node.args else None
        in_layout = self.packed.get(x) if isinstance(x, fx.Node) else None
        if op in _SHAPE_OPS:
            return in_layout is not None and self._reshape(node)
        if op in _LAYOUT_OPS:
            return in_layout is not None and self._mark(node, self.sym.layout(val))
        if op in _DIM_OPS or op in _NORMS:
            if in_layout is None or not self._other_dims(node, in_layout):
                return False
            return self._operands(node) and self._mark(node, _first_layout(self.sym, val))
        if op is aten.slice.Tensor:
            return in_layout is not None and self._slice_ok(node, in_layout) and self._mark(node, self.sym.layout(val))
        if op is aten.cat.default:
            return self._cat(node)
        if op in _WEIGHT_OPS or torch.Tag.pointwise in getattr(op, "tags", ()):
            return self._operands(node) and self._mark(node, self.sym.layout(val))
        return False

    def _mark(self, node: fx.Node, layout: Optional[Layout]) -> bool:
        if layout is None or layout.batch == NO_BATCH:
            return False
        self.packed[node] = layout
        node.meta[PACKED] = layout
        return True

    def _operands(self, node: fx.Node) -> bool:
        """Pack every broadcast operand with a sequence dim; refuse per-sequence ones."""
        out = _first_layout(self.sym, node.meta.get("val"))
        rank = _first_rank(node.meta.get("val"))
        if out is None:
            return False
        if node.target in _WEIGHT_OPS:
            acts = [a for a in node.all_input_nodes if a in self.packed or _has_roles(self.sym, a)]
            if len(acts) != 1:
                return False  # two activations contracted (attention written out by hand)
            return True
        plan: dict[fx.Node, fx.Node] = {}
        for a in node.all_input_nodes:
            if a in self.packed:
                continue
            val = a.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            layout = self.sym.aligned(val, out, rank) if val.dim() <= rank else None
            if layout is None:
                if self.sym.per_sequence(val, out, rank) or self.sym.layout(val) is not None:
                    return False
                continue
            with self.g.inserting_before(node):
                plan[a] = self._pack_node(a, layout)
        node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: plan.get(a, a))
        return True

    def _other_dims(self, node: fx.Node, layout: Layout) -> bool:
        """The op's dims (or a norm's normalized dims) leave the batch and sequence alone."""
        rank = node.args[0].meta["val"].dim()
        if node.target in _NORMS:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            dims = range(rank - len(shape), rank)
        else:
            pos = _DIM_OPS[node.target]
            dims = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim")
            if dims is None:
                return False  # over every dim
            dims = [dims] if isinstance(dims, int) else list(dims)
            dims = [d % rank for d in dims]
        return not (set(dims) & layout.dims) and (layout.batch != FLAT or layout.seq not in dims)

    def _slice_ok(self, node: fx.Node, layout: Layout) -> bool:
        x, dim, start, end, step = (*node.args, *(0, 0, None, None, 1)[len(node.args):])
        dim %= x.meta["val"].dim()
        whole = start in (None, 0) and (end is None or (isinstance(end, int) and end >= _BIG)) and step == 1
        return whole or dim not in layout.dims

    def _cat(self, node: fx.Node) -> bool:
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        out = self.sym.layout(node.meta.get("val"))
        if out is None or dim % node.meta["val"].dim() in out.dims:
            return False
        return self._operands(node) and self._mark(node, out)

    def _reshape(self, node: fx.Node) -> bool:
        sizes = []
        for s in node.args[1]:
            role = self.sym.role(s.meta.get("val") if isinstance(s, fx.Node) else s)
            if isinstance(s, fx.Node) and role is None:
                return False  # a size computed some other way: cannot say what it is packed
            sizes.append(1 if role == "batch" else self.n if role in ("seq", "flat") else s)
        val = node.meta.get("val")
        layout = self.sym.layout(val)
        if layout is None or layout.batch == NO_BATCH:  # before the sizes change: the node stays padded
            return False  # (DeBERTa folds heads into the batch: [B·H, S, d] kept its packed N)
        # A -1 becomes the size it stands for: with no real token in the batch (N = 0) a view of
        # 0 elements cannot infer it ([1, 0, -1, 16] is ambiguous).
        sizes = [self._inferred(val.shape[i]) if isinstance(s, int) and s == -1 else s for i, s in enumerate(sizes)]
        node.args = (node.args[0], sizes, *node.args[2:])
        return self._mark(node, layout)

    def _inferred(self, size) -> Any:
        """A dim of a logical value as a packed view's size: N for the sequence (or flat tokens),
        1 for the batch, the number itself for a feature dim; else -1 as it was."""
        role = self.sym.role(size)
        if role in ("seq", "flat"):
            return self.n
        if role == "batch":
            return 1
        return size if isinstance(size, int) else -1

    def _sym_size(self, node: fx.Node) -> bool:
        x, dim = node.args
        layout = self.packed[x]
        dim %= x.meta["val"].dim()
        if dim == layout.batch:
            node.args = (self.mask, 0)
        elif dim == layout.seq:
            if layout.batch == FLAT:
                return False
            node.args = (self.mask, 1)
        return True

    def _attention(self, node: fx.Node) -> bool:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        defaults = (None, None, None, None, 0.0, False, None, False)
        a = dict(zip(names, defaults))
        a.update(zip(names, node.args))
        a.update(node.kwargs)
        if a["dropout_p"] or (a["attn_mask"] is not None and a["attn_mask"] in self.packed):
            return False
        out = self.sym.layout(node.meta.get("val"))
        if out is None or out.batch < 0:
            return False
        qkv = []
        for name in ("query", "key", "value"):
            t = a[name]
            if t not in self.packed:
                layout = self.sym.aligned(t.meta["val"], out, 4)
                if layout is None or layout.batch < 0:
                    return False
                with self.g.inserting_before(node):
                    t = self._pack_node(t, layout)
            qkv.append(t)
        node.target = token_ops.packed_attention
        node.args = (*qkv, a["attn_mask"], self.bi, self.si, self.batch, a["scale"], bool(a["is_causal"]),
                     bool(a["enable_gqa"]))
        node.kwargs = {}
        self.result.attention += 1
        return self._mark(node, out)


def _common_stack(a: fx.Node, b: fx.Node) -> Optional[dict]:
    """The outermost entries that `a`'s and `b`'s nn_module_stack share (None: no module)."""
    sa, sb = a.meta.get("nn_module_stack") or {}, b.meta.get("nn_module_stack") or {}
    shared = {}
    for (ka, va), (kb, vb) in zip(sa.items(), sb.items()):
        if ka != kb or va != vb:
            break
        shared[ka] = va
    return shared or None


def _first_layout(sym: Symbols, val: Any) -> Optional[Layout]:
    """The layout of a value, or of a tuple's first element (native_layer_norm, max.dim)."""
    return sym.layout(val[0] if isinstance(val, (tuple, list)) else val)


def _has_roles(sym: Symbols, node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(sym.role(s) for s in val.shape)


def _first_rank(val: Any) -> int:
    v = val[0] if isinstance(val, (tuple, list)) else val
    return v.dim() if isinstance(v, torch.Tensor) else 0
