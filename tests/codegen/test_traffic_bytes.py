"""The traffic model counts bytes by each value's own dtype, and a value read together with a view
of it once (codegen/traffic.py), checked against hand counts."""
from __future__ import annotations

import torch
from torch import nn

from slimfx.codegen.traffic import measure

from graphs import D, capture


def test_half_precision_values_count_two_bytes_each():
    gm, x = capture([("linear", (0,)), ("relu", (1,))], dtype=torch.float16)
    unfused, fused, _ = measure(gm, [x])
    act = 3 * D * 2  # one [3, 8] float16 activation
    weights = (D * D + D) * 2
    # unfused: linear reads x, writes y; relu reads y, writes r. fused: reads x, writes r and y
    # (the program returns its last two values).
    assert (unfused.kernels, unfused.activation_bytes, unfused.weight_bytes) == (2, 4 * act, weights)
    assert (fused.kernels, fused.activation_bytes, fused.weight_bytes) == (1, 3 * act, weights)


class PlusTranspose(nn.Module):
    def forward(self, x):
        return x + x.t()


def test_a_value_and_a_view_of_it_read_by_one_kernel_are_read_once():
    x = torch.randn(4, 4)
    gm = torch.export.export(PlusTranspose(), (x,)).module()
    unfused, _, _ = measure(gm, [x])
    assert (unfused.kernels, unfused.activation_bytes) == (1, 2 * 16 * 4)  # reads x once, writes the sum


class PlusExpandedRow(nn.Module):
    def forward(self, x, m):
        return x + m.expand(x.shape[0], -1)


def test_an_expanded_value_is_read_once_per_element_of_its_source():
    x, m = torch.randn(4, 8), torch.randn(1, 8)
    gm = torch.export.export(PlusExpandedRow(), (x, m)).module()
    unfused, fused, _ = measure(gm, [x, m])
    # reads x (128 B) and m's 8 floats (32 B, not the expanded 128), writes the sum (128 B)
    assert unfused.activation_bytes == fused.activation_bytes == 128 + 32 + 128
