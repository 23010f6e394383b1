"""passes/calibrate.py: calibration rows of real tokens; the damped Hessian the solvers share."""
from __future__ import annotations

import pytest
import torch

from slimfx.passes.calibrate import DiagonalAccumulator, HessianAccumulator, damped, kept_rows, merged, real_rows


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("permuted", [False, True])
def test_damped_is_a_float64_copy_with_the_ridge_on_its_diagonal(dtype, permuted):
    x = torch.randn(40, 6, dtype=torch.float64)
    H = (x.T @ x / 40).to(dtype)
    kept = H.clone()
    perm = torch.tensor([3, 0, 5, 1, 4, 2]) if permuted else None
    got = damped(H, 0.01, perm)
    # Written out as the solvers once did: an identity matrix scaled by the mean diagonal.
    order = perm if permuted else torch.arange(6)
    want = H.double()[order][:, order] + 0.01 * H.double().diagonal().mean() * torch.eye(6, dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)  # the mean summed in another order
    assert torch.equal(H, kept)  # the caller's H is never written


def test_damped_keeps_an_all_zero_hessian_positive():
    got = damped(torch.zeros(3, 3, dtype=torch.float64), 0.01)
    assert (got.diagonal() > 0).all() and torch.linalg.cholesky_ex(got).info == 0


def test_observe_stops_after_the_last_watched_node(monkeypatch):
    """Every observe ran the whole graph, the LM head too, for rows from its middle (a heal's cut,
    a Hessian of block 0): the run now stops once the last watched node is seen, with the rows
    it would have given."""
    from torch import fx

    from slimfx.models import tiny
    from slimfx.passes.calibrate import observe
    from slimfx.passes.capture import capture

    lm = tiny("llama", layers=4)
    graph = capture(lm.model, lm.example_inputs)
    ran, real = [], fx.Interpreter.run_node
    monkeypatch.setattr(fx.Interpreter, "run_node", lambda self, n: (ran.append(n), real(self, n))[1])
    early, late = [], []
    observe(graph, {graph.blocks[0].output: [early.append]}, [lm.example_inputs])
    stopped = len(ran)
    observe(graph, {graph.blocks[0].output: [late.append], graph.blocks[3].output: [lambda r: None]},
            [lm.example_inputs])
    assert stopped < len(ran) - stopped < len(graph.module.graph.nodes)
    assert ran[stopped - 1] is graph.blocks[0].output and torch.equal(early[0], late[0])


def test_forward_ms_reports_the_least_disturbed_run_after_two_warm_ups(monkeypatch):
    """The median of 3 let one busy stretch of a shared machine into the report (a drop of 2
    blocks of 30 read ×0.23); the least of 5 after two warm-ups keeps the run nearest the truth."""
    from slimfx.passes import calibrate

    durations = iter([9.0, 9.0, 0.4, 0.1, 0.5, 0.3, 0.6])  # seconds: two warm-ups, then five timed
    clock = [0.0]

    def perf_counter():
        return clock[0]

    def call(**_):
        clock[0] += next(durations)

    monkeypatch.setattr(calibrate.time, "perf_counter", perf_counter)
    assert calibrate.forward_ms(call, {}) == pytest.approx(100.0)
    with pytest.raises(StopIteration):
        next(durations)  # exactly two warm-ups and FORWARD_REPEATS timed calls


@pytest.mark.parametrize("kind", [HessianAccumulator, DiagonalAccumulator])
def test_merged_is_one_accumulator_fed_every_row(kind):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 6, generator=gen) for n in (5, 1, 9)]
    parts, whole = [kind() for _ in batches], kind()
    for acc, rows in zip(parts, batches):
        acc.add(rows)
        whole.add(rows)
    before = [acc.H.clone() for acc in parts]
    out = merged([*parts, kind()])  # an empty one adds nothing
    assert type(out) is kind and out.count == 15
    torch.testing.assert_close(out.H, whole.H, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(acc.H, h) for acc, h in zip(parts, before))  # the parts are left as they were
    assert merged(parts[:1]) is parts[0]
