"""Autotuning of the generated kernels (codegen/tuning.py). Without a GPU the tuned launchers run
under Triton's interpreter with SLIMFX_AUTOTUNE=1, timed by the wall clock: every config of a
template is launched and timed, the result still equals the eager backend, one M bucket is timed
once; without the setting the interpreter keeps the fixed choice and times nothing."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.codegen import tuning
from slimfx.codegen.emit_gemm import block_sizes, emit_gemm
from slimfx.codegen.partition import partition
from slimfx.codegen.tuning import gemm_configs, m_bucket, row_configs, tuning_enabled
from slimfx.models import tiny

from graphs import QuantLinear, capture_module


@pytest.fixture
def fresh_tuners(monkeypatch):
    """An empty table of tuned launchers, and a count of the configs timed."""
    monkeypatch.setattr(tuning, "_TUNED", {})
    timed, original = [], tuning.wall_clock_bench

    def counting_bench(fn, quantiles=None, **kw):
        timed.append(fn)
        return original(fn, quantiles, **kw)

    monkeypatch.setattr(tuning, "wall_clock_bench", counting_bench)
    return timed


def test_tuning_on_a_gpu_and_under_the_interpreter_only_when_asked(monkeypatch):
    monkeypatch.delenv("SLIMFX_AUTOTUNE", raising=False)
    assert tuning_enabled(interpreted=False) and not tuning_enabled(interpreted=True)
    monkeypatch.setenv("SLIMFX_AUTOTUNE", "1")
    assert tuning_enabled(interpreted=True) and tuning_enabled(interpreted=False)
    monkeypatch.setenv("SLIMFX_AUTOTUNE", "0")
    assert not tuning_enabled(interpreted=False) and not tuning_enabled(interpreted=True)
    monkeypatch.setenv("SLIMFX_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="use 1 .* 0 .* or leave it unset"):
        tuning_enabled(interpreted=False)


@pytest.mark.parametrize("m,bucket", [(1, 1), (2, 4), (4, 4), (5, 16), (16, 16), (17, 32), (64, 64), (65, 128), (256, 256), (257, 512),
                                      (8192, 512)])
def test_m_buckets(m, bucket):
    assert m_bucket(m) == bucket


@pytest.mark.parametrize("m", [1, 3, 16, 17, 48, 100, 256, 4096])
def test_every_gemm_config_is_a_legal_tile_and_includes_the_fixed_choice(m):
    configs = gemm_configs(m_bucket(m))
    tiles = [(c["kwargs"]["BM"], c["kwargs"]["BN"], c["kwargs"]["BK"], c["kwargs"]["GEMV"]) for c in configs]
    assert len(set(tiles)) * 2 - len(configs) == sum(  # each tile with two launch settings, but (spills)
        bm * bn >= 128 * 128 or bn * bk >= 128 * 128 if not gemv else bm * bn * bk < 16 * 32 * 8
        for bm, bn, bk, gemv in set(tiles))
    # a GEMV tile of fewer than 16 products a thread at 8 warps: Triton 3.6's ptxas spilled one
    assert all(c["num_warps"] == 4 or c["kwargs"]["BM"] * c["kwargs"]["BN"] * c["kwargs"]["BK"] >= 16 * 32 * 8
               for c in configs if c["kwargs"]["GEMV"])
    for *tile, gemv in tiles:
        assert all(size & (size - 1) == 0 for size in tile), tile  # powers of 2 (tl.arange)
        if gemv:  # no tl.dot: a row tile of exactly the bucket's rows, a bounded [BM, BN, BK] product
            assert tile[0] == m_bucket(m) <= 4 and tile[0] * tile[1] * tile[2] <= 8192, tile
        else:
            assert min(tile) >= 16, tile  # tl.dot: 16 or more on each side
    assert any(gemv for *_, gemv in tiles) == (m <= 4)  # decode steps may go either way; the tuner picks
    assert (*block_sizes(m, interpreted=False), False) in tiles  # tuning never loses the untuned choice
    assert all(c["num_warps"] in (2, 4, 8) and c["num_stages"] >= 1 for c in configs)
    assert {c["num_warps"] for c in row_configs()} == {1, 2, 4, 8, 16}


def _gemm(model, x):
    gm = capture_module(model, x)
    (group,) = [g for g in partition(gm) if g.kind == "gemm"]
    return emit_gemm(group)


def test_a_tuned_gemm_times_every_config_once_per_m_bucket(monkeypatch, fresh_tuners):
    monkeypatch.setenv("SLIMFX_AUTOTUNE", "1")
    model = QuantLinear(40, 24, 4, 16, False, True, "silu")
    kernel = _gemm(model, torch.randn(2, 40))
    assert [role for _, role in kernel.inputs[:4]] == ["x", "qweight", "scales", "zeros"]
    extra = [r for _, r in kernel.inputs[4:]]
    assert extra == ["col"], extra  # the bias: read from the model below
    for m, new_timings in ((3, len(gemm_configs(4))), (4, 0), (9, len(gemm_configs(16))), (5, 0),
                           (20, len(gemm_configs(32)))):
        x = torch.randn(m, 40)
        before = len(fresh_tuners)
        (got,) = kernel.launch([x, model.qweight, model.scales, model.zeros, model.bias])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)
        assert len(fresh_tuners) - before == new_timings, (m, len(fresh_tuners) - before)
    tuners = {key[1:]: t for key, t in tuning._TUNED.items()}
    assert set(tuners) == {("gemm", 4), ("gemm", 16), ("gemm", 32)}
    for (_, bucket), tuner in tuners.items():
        assert tuner.best_config.kwargs in [c["kwargs"] for c in gemm_configs(bucket)]


def test_without_the_setting_the_interpreter_times_nothing(monkeypatch, fresh_tuners):
    monkeypatch.delenv("SLIMFX_AUTOTUNE", raising=False)
    model = QuantLinear(40, 24, 4, 16, False, True, "silu")
    kernel = _gemm(model, torch.randn(2, 40))
    x = torch.randn(3, 40)
    (got,) = kernel.launch([x, model.qweight, model.scales, model.zeros, model.bias])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)
    assert fresh_tuners == [] and tuning._TUNED == {}


def test_a_tiny_llama_with_tuned_kernels_equals_the_eager_backend(monkeypatch, fresh_tuners):
    """Both templates tuned (the GEMMs with int4 weights and LoRA, the RMSNorm rows), every
    config of each launched and timed, the logits as eager's."""
    monkeypatch.setenv("SLIMFX_AUTOTUNE", "1")
    lm = tiny("llama")
    policy = "quantize blocks.*.** : Linear int4 group=32\nadapt blocks.*.self_attn.q_proj lora rank=4\n"
    eager = slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, backend="eager")
    cm = slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, backend="triton")
    with torch.no_grad():
        want = eager(**lm.example_inputs).logits
        got = cm(**lm.example_inputs).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    templates = {key[1] for key in tuning._TUNED}
    assert templates == {"gemm", "rows"}
    for key, tuner in tuning._TUNED.items():
        assert len(tuner.configs) == len(gemm_configs(key[2]) if key[1] == "gemm" else row_configs())
        assert tuner.best_config in tuner.configs
    # every launcher timed each of its configs once per key it met
    assert len(fresh_tuners) >= sum(len(t.configs) for t in tuning._TUNED.values())


def test_a_tiny_llama_decode_step_in_gemv_form_equals_the_eager_backend(monkeypatch, fresh_tuners):
    """Decode-sized calls (1 and 3 tokens) with only GEMV configs to choose from: every GEMM of
    the model — merged q/k/v with two nonzero LoRA paths, gate/up with SwiGLU, o, down, the
    head — in the broadcast-product form, the logits as the eager backend's."""
    from slimfx.codegen import emit_gemm as emit_gemm_module

    monkeypatch.setenv("SLIMFX_AUTOTUNE", "1")
    monkeypatch.setattr(emit_gemm_module, "gemm_configs",
                        lambda bucket, lora_width=0: [c for c in gemm_configs(bucket, lora_width)
                                                      if c["kwargs"]["GEMV"]][:2])
    lm = tiny("llama")
    policy = "quantize blocks.*.** : Linear int4 group=16\nadapt blocks.*.attn.{q,v} lora rank=4 alpha=8\n"
    eager = slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, backend="eager")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in eager.adapter_parameters():  # a fresh adapter's B is zero: it would hide the rank path
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    cm = slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, backend="triton")
    cm.load_state_dict(eager.state_dict())
    for tokens in (1, 3):
        inputs = {k: v[:1, :tokens] for k, v in lm.example_inputs.items()}
        with torch.no_grad():
            torch.testing.assert_close(cm(**inputs).logits, eager(**inputs).logits, atol=2e-5, rtol=2e-5)
    gemms = {key[2]: t for key, t in tuning._TUNED.items() if key[1] == "gemm"}
    assert set(gemms) == {1, 4} and fresh_tuners  # both decode buckets went through the tuned GEMV configs


def test_a_lora_gemv_keeps_its_rank_products_in_registers():
    """With a LoRA path the GEMV form also sums [BM, RP, BK] and [BM, BN, RP] products: configs
    where that is over 128 values a thread are not offered (ptxas spilled these at rank 64)."""
    def gemv(bucket, width):
        return {(c["kwargs"]["BN"], c["kwargs"]["BK"], c["num_warps"]) for c in gemm_configs(bucket, width)
                if c["kwargs"]["GEMV"]}

    for bucket in (1, 4):
        assert gemv(bucket, 16) == gemv(bucket, 0)  # rank ≤ 16: nothing spilled, nothing dropped
        for width in (32, 64, 128, 256):
            assert all(bucket * width * max(bn, bk) <= 128 * 32 * warps for bn, bk, warps in gemv(bucket, width))
    spilled_at_64 = {(8, 128, 4), (8, 256, 4), (8, 256, 8), (16, 128, 4)}  # 4-row bucket, 0.7-1.4 KB a thread
    assert not gemv(4, 64) & spilled_at_64 and gemv(4, 64) == {(8, 128, 8), (16, 128, 8), (32, 64, 4), (32, 64, 8)}
    assert gemv(1, 64) and [c for c in gemm_configs(4, 256) if not c["kwargs"]["GEMV"]]  # tl.dot tiles stay


def test_after_its_first_launch_at_a_bucket_a_kernel_launches_the_tuners_choice_without_it(monkeypatch, fresh_tuners):
    """The autotuner's per-call Python (a dict of every argument, a dtype string each) is
    microseconds of a GPU launch: it runs at a bucket's first launch only, the later ones launch
    the config it chose directly — and compute what it would have."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setenv("SLIMFX_AUTOTUNE", "1")
    runs, original_run = [], Autotuner.run

    def counting_run(self, *args, **kwargs):
        runs.append(self)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counting_run)
    model = QuantLinear(40, 24, 4, 16, False, True, "silu")
    kernel = _gemm(model, torch.randn(2, 40))
    for m, through_tuner in ((3, 1), (4, 0), (2, 0), (9, 1), (5, 0)):
        x = torch.randn(m, 40)
        before = len(runs)
        (got,) = kernel.launch([x, model.qweight, model.scales, model.zeros, model.bias])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)
        assert len(runs) - before == through_tuner, m
    for (bucket, _), (fn, config) in kernel._chosen.items():
        assert {k: config[k] for k in ("BM", "BN", "BK", "GEMV")} == tuning._TUNED[(kernel.name, *bucket)].best_config.kwargs


def test_output_shapes_are_worked_out_once_per_binding_of_the_symbolic_sizes(monkeypatch):
    from slimfx.codegen.kernel import Shapes

    evaluated, original = [], Shapes.evaluate
    monkeypatch.setattr(Shapes, "evaluate", lambda self, sizes: evaluated.append(sizes) or original(self, sizes))
    model = QuantLinear(40, 24, 4, 16, False, True, "silu")
    kernel = _gemm(model, torch.randn(2, 40))
    for m in (3, 3, 7, 3, 7):
        assert kernel.output_shapes([torch.randn(m, 40)]) == ((m, 24),)
    assert len(evaluated) == 2
