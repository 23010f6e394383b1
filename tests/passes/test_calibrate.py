"""passes/calibrate.py: calibration rows of real tokens."""
from __future__ import annotations

import torch

from slimfx.passes.calibrate import kept_rows, real_rows


def test_rows_of_a_batch_without_padding_are_a_view_not_a_copy():
    """The sweeps read every watched value as rows; a copy of down_proj's input was 19 MiB of
    compile's peak on SmolLM2, for a mask that leaves nothing out."""
    value = torch.randn(2, 5, 3)
    for batch in ({"attention_mask": torch.ones(2, 5, dtype=torch.long)}, {}):
        rows = real_rows(value, kept_rows(batch))
        assert rows.shape == (10, 3) and rows.data_ptr() == value.data_ptr()
        assert torch.equal(rows, value.reshape(10, 3))


def test_padding_rows_are_left_out_in_order():
    value = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rows = real_rows(value, kept_rows({"attention_mask": mask}))
    assert torch.equal(rows, torch.cat([value[0, :3], value[1, :2]]))
