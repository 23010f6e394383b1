"""DoRA's base term under dropout, present only while the adapters train.

DoRA scales the base linear's output: `term = (k − 1) · base + k · s · B(A(dropout(x)))`. In eval
dropout is the identity and `base` is PEFT's `y − bias` (the base linear's own output, computed
once). In training PEFT uses the dropped-out input for the base as well, `W · dropout(x)`, which is
a second matmul with the base weight. It is written here as `base + W · (dropout(x) − x)`, so the
graph keeps `y` and the correction is the only extra work.

The adapter pass builds the eval form (the `k − 1` product tagged part "dora_base"); `set_dropout`
(runtime/adapters.py) inserts the correction when the model trains and removes it again in eval,
so an eval call never multiplies a tensor of zeros by the weight (it did: one extra matmul per
adapted linear, which PEFT skips in eval).
"""
from __future__ import annotations

import torch
from torch import fx

from .adapters import Adapter, tag, tag_of

aten = torch.ops.aten
BASE_PRODUCT = "dora_base"  # part of `(k − 1) · base`: its second argument is the base term
CORRECTION = "dropped_base"  # part of the nodes computing `base + W · (dropout(x) − x)`


def set_dora_dropout(graph: fx.Graph, training: bool) -> bool:
    """Insert (training) or remove (eval) the correction of every DoRA adapter with dropout in
    `graph`; True if the graph changed."""
    changed = False
    for dropout, weight, product in _sites(graph):
        present = tag_of(product.args[1]) is not None and tag_of(product.args[1])["part"] == CORRECTION
        if training and not present:
            _insert(graph, dropout, weight, product)
            changed = True
        elif not training and present:
            _remove(graph, product)
            changed = True
    return changed


def _sites(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(dropout, weight, product) per call of a DoRA base linear with dropout. A call's adapter
    nodes follow its base linear in one run (passes/lora.py builds them after it), so each dropout
    node is paired with the next weight and product node of the same target."""
    sites, open_ = [], {}
    for node in graph.nodes:
        t = tag_of(node)
        if t is None or t["method"] != "dora":
            continue
        if t["part"] == "dropout":
            open_[t["target"]] = [node, None]
        elif t["part"] == "weight" and t["target"] in open_:
            open_[t["target"]][1] = node
        elif t["part"] == BASE_PRODUCT and t["target"] in open_:
            dropout, weight = open_.pop(t["target"])
            if weight is None:
                raise RuntimeError(f"DoRA adapter of {t['target']}: no base weight node between its dropout "
                                   "and its base term; the graph was edited outside slimfx")
            sites.append((dropout, weight, node))
    return sites


def _insert(graph: fx.Graph, dropout: fx.Node, weight: fx.Node, product: fx.Node) -> None:
    adapter = Adapter.from_meta(tag_of(product))
    base = product.args[1]
    with graph.inserting_before(product):
        moved = graph.call_function(aten.sub.Tensor, (dropout, dropout.args[0]))
        w = graph.call_function(aten.type_as.default, (weight, moved))  # the weight in the activations' dtype
        change = graph.call_function(aten.linear.default, (moved, w))
        corrected = graph.call_function(aten.add.Tensor, (base, change))
    for node, like in ((moved, dropout), (w, None), (change, base), (corrected, base)):
        val = like.meta.get("val") if like is not None else None
        if val is not None:
            node.meta["val"] = val
        tag(node, adapter, CORRECTION)
    product.args = (product.args[0], corrected)


def _remove(graph: fx.Graph, product: fx.Node) -> None:
    corrected = product.args[1]
    change = corrected.args[1]
    moved, w = change.args
    product.args = (product.args[0], corrected.args[0])
    for node in (corrected, change, w, moved):
        graph.erase_node(node)
