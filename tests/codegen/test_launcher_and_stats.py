"""A lowered graph called directly with an input that requires grad refuses (its kernels have no
backward: codegen/lower.py `launcher`), and `--stats` counts as eager ops only the kernels a
lowered graph still launches outside generated ones (codegen/stats.py)."""
from __future__ import annotations

import pytest
import torch
from torch import fx

from slimfx.codegen.lower import lower_graph
from slimfx.codegen.stats import stats

from graphs import capture


def test_a_launcher_reached_with_a_gradient_refuses():
    gm, x = capture([("linear", (0,)), ("relu", (1,)), ("softmax", (2,))])
    new, _ = lower_graph(gm.graph)
    lowered = fx.GraphModule(gm, new)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x))
    with pytest.raises(RuntimeError, match="no backward"):
        lowered(x.clone().requires_grad_())


def test_stats_counts_no_eager_ops_for_a_graph_every_group_of_which_is_generated():
    gm, x = capture([("linear", (0,)), ("relu", (1,)), ("softmax", (2,)), ("add", (3, 0))])
    s = stats(gm, [x])
    assert s.generated == 2 and s.eager_ops == 0, (s.generated, s.eager_ops)


def test_stats_rows_add_up_every_group_of_a_kind():
    # two softmax groups of one description: the row's bytes are both groups', and the rows
    # together are the fused traffic
    gm, x = capture([("softmax", (0,)), ("linear", (1,)), ("softmax", (2,))])
    s = stats(gm, [x])
    assert sum(nbytes for *_, nbytes in s.rows()) == s.fused.total_bytes
    assert any(n == 2 for n, *_ in s.rows())
