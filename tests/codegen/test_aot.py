"""Generated kernels compiled ahead of time for an H100/H200 (sm_90) on this GPU-less machine
(codegen/aot.py): every kernel of a tiny Llama with int4 GEMMs, fused LoRA, merged q/k/v and
gate/up and its row kernels, in float32, float16 and bfloat16, compiles to PTX and a cubin with
what a block may have in shared memory; half-precision GEMMs multiply on tensor cores, float32
ones in IEEE float32 (never TF32); every autotune candidate of a GEMM and a row source compiles
and fits. What the interpreter-run tests cannot show: the real compiler's view of the sources."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import slimfx
from slimfx.codegen.aot import HOPPER, SHARED_BYTES, compile_for, compile_many, launch_configs, tuned_configs
from slimfx.codegen.emit import emit_all
from slimfx.codegen.emit_gemm import emit_gemm
from slimfx.codegen.partition import partition
from slimfx.codegen.tuning import gemm_configs
from slimfx.models import tiny

from graphs import QuantLinear, capture, capture_module, programs

STORED = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture
def no_interpreter(monkeypatch):
    """Emission as on a GPU: with the interpreter on, bfloat16 GEMMs are left to eager ops."""
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "interpret", False)


def _llama_kernels(dtype, adapted="{q,v}", rank=4):
    lm = tiny("llama", layers=1)
    policy = ("quantize blocks.*.** : Linear int4 group=16\n"
              f"adapt blocks.*.attn.{adapted} lora rank={rank} alpha=8 dtype={STORED[dtype]}")
    cm = slimfx.compile(lm.model.to(dtype), policy, example_inputs=lm.example_inputs, backend="eager")
    done = emit_all(partition(cm.program))
    unique = {k.name: k for k in done.kernels}
    return list(unique.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_kernel_of_a_tiny_llama_compiles_for_hopper(dtype, no_interpreter):
    kernels = _llama_kernels(dtype)
    gemms = [k for k in kernels if k.template == "gemm"]
    assert len(gemms) >= 4 and any("lora" in k.source for k in gemms)
    built = dict(zip((k.name for k in kernels), compile_many([(k, None) for k in kernels])))
    for kernel in kernels:
        for b in built[kernel.name]:
            assert ".target sm_90" in b.ptx
            assert b.shared <= SHARED_BYTES[HOPPER], (kernel.name, b.config, b.shared)
            assert not b.uses("tf32"), (kernel.name, b.config)  # float32 products stay IEEE
            if kernel.template == "gemm":
                # Half tiles go to tl.dot as they are: tensor cores. float32 ones ("ieee"): CUDA cores.
                assert b.tensor_cores == (dtype != torch.float32), (kernel.name, b.config)
                assert b.uses("fma.rn.f32") or dtype != torch.float32
    if dtype != torch.float32:
        # Hopper's warpgroup MMA for the prefill tile (64 rows); the decode tile (16 rows) is below its size.
        prefill = [b for k in gemms for b in built[k.name] if b.config["kwargs"]["BM"] == 64]
        assert prefill and all(b.uses("wgmma.mma_async") for b in prefill)


def test_every_autotune_candidate_compiles_and_fits_in_shared_memory_and_registers(no_interpreter):
    """The widest case: a bfloat16 int4 GEMM with both LoRA paths of q/k/v, and an RMSNorm row."""
    kernels = _llama_kernels(torch.bfloat16)
    gemm = max((k for k in kernels if k.template == "gemm"), key=lambda k: k.source.count("tl.dot"))
    row = next(k for k in kernels if k.template == "rows" and "tl.rsqrt" in k.source)
    configs = tuned_configs(gemm)
    every = [c for bucket in (1, 4, 16, 32, 64, 128, 256, 512) for c in gemm_configs(bucket, gemm.lora_width)]
    assert [(c["kwargs"], c["num_warps"], c["num_stages"]) for c in configs] == \
        [(c["kwargs"], c["num_warps"], c["num_stages"]) for c in every]
    assert {str(c["kwargs"]) for c in launch_configs(gemm)} <= {str(c["kwargs"]) for c in configs}
    # The 1- and 4-row buckets' tl.dot tiles are the 16-row bucket's, but compiled again: a call
    # of one row has M as a constant (aot.py specializes as the JIT does), which changes the code.
    for kernel, built in zip((gemm, row), compile_many([(gemm, configs), (row, tuned_configs(row))])):
        assert len(built) == len(configs if kernel is gemm else tuned_configs(row))
        for b in built:
            assert b.shared <= SHARED_BYTES[HOPPER], (kernel.name, b.config, b.shared)
            if kernel is gemm:  # the GEMV form sums on the CUDA cores; every other tile is on tensor cores
                assert b.tensor_cores != b.config["kwargs"]["GEMV"], b.config
            # a candidate whose registers spill is never worth timing (a few bytes aside)
            assert b.spilled <= 64 and (b.spilled == 0 or not b.config["kwargs"].get("GEMV")), \
                (kernel.name, b.config, b.registers, b.spilled)


def test_a_wide_lora_path_leaves_no_gemv_candidate_that_spills(no_interpreter):
    """Rank 64: the GEMV form's rank products are 4x those of rank 16 (tuning.gemm_configs drops
    the configs where ptxas spilled them)."""
    gemm = next(k for k in _llama_kernels(torch.bfloat16, "q", 64) if k.template == "gemm" and "lora" in k.source)
    assert gemm.lora_width == 64
    configs = [c for c in tuned_configs(gemm) if c["kwargs"]["GEMV"]]
    built = compile_many([(gemm, configs)])[0]
    assert len(built) == len(configs) >= 15
    assert all(b.spilled == 0 for b in built), [(b.config["kwargs"], b.config["num_warps"], b.spilled)
                                                  for b in built if b.spilled]


@pytest.mark.parametrize("bits,group,zero", [(8, None, "int"), (2, 16, "int"), (4, 32, "float")])
def test_other_packed_formats_compile_in_bfloat16(bits, group, zero, no_interpreter):
    model = QuantLinear(40, 24, bits, group, zero == "int" and bits == 8, True, "silu", zero=zero).to(torch.bfloat16)
    gm = capture_module(model, torch.randn(2, 40, dtype=torch.bfloat16))
    (found,) = [g for g in partition(gm) if g.kind == "gemm"]
    built = compile_for(emit_gemm(found))
    assert built[0].types["x_ptr"] == "*bf16" and built[0].types["qw0_ptr"] == "*u8"
    assert built[0].types["out0_ptr"] == "*bf16" and built[1].types["M"] == "i32"  # [0] is decode: M = 1
    assert all(b.tensor_cores for b in built)


@settings(max_examples=8, deadline=None)
@given(programs(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_the_kernels_of_random_graphs_compile_for_hopper(steps, dtype):
    """Every op of the expression table as the real compiler sees it (the interpreter accepts
    some things Triton's compiler does not), in both formats."""
    from triton import knobs

    gm, _ = capture(steps, dtype=dtype)
    old = knobs.runtime.interpret
    knobs.runtime.interpret = False  # bfloat16 GEMMs are emitted, as on a GPU
    try:
        kernels = list({k.name: k for k in emit_all(partition(gm)).kernels}.values())
    finally:
        knobs.runtime.interpret = old
    for kernel, built in zip(kernels, compile_many([(k, None) for k in kernels])):
        assert built and all(b.shared <= SHARED_BYTES[HOPPER] for b in built), kernel.name


def test_calls_are_specialized_as_the_jit_does_and_loads_are_pipelined(no_interpreter):
    """With a sample call's integers (1 → a constant, multiples of 16 → a hint) and aligned
    pointers, the weight loads of a multi-stage config become asynchronous copies into shared
    memory; one stage keeps them synchronous."""
    model = QuantLinear(512, 512, 4, 128, True, False, "none").to(torch.bfloat16)
    gm = capture_module(model, torch.randn(2, 512, dtype=torch.bfloat16))
    (found,) = [g for g in partition(gm) if g.kind == "gemm"]
    kernel = emit_gemm(found)
    decode, prefill = launch_configs(kernel)
    assert decode["ints"]["M"] == 1 and prefill["ints"]["M"] == 256
    tiles = [{**prefill, "num_stages": stages} for stages in (1, 4)]
    one, four = compile_for(kernel, [decode] + tiles)[1:]
    assert compile_for(kernel, [decode])[0].types["M"] == "constexpr"  # M = 1 specialized, as the JIT does
    assert one.types["M"] == "i32" and one.types["stride_xk"] == "constexpr"
    assert not one.uses("cp.async") and four.uses("cp.async") and four.shared > one.shared


def test_a_source_that_does_not_compile_says_so():
    kernels = _llama_kernels(torch.float32)
    broken = copy.copy(kernels[0])
    broken.source = kernels[0].source.replace("tl.load(", "tl.lod(", 1)
    with pytest.raises(RuntimeError, match=r"(?s)ahead-of-time compilation for sm_90 failed: .*lod"):
        compile_for(broken)
