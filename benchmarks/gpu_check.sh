#!/usr/bin/env bash
# The code generator's device checks (issue 10) as one script for a lent NVIDIA GPU: versions and
# the device, the GPU tests (generated kernels in float32, float16 and bfloat16 against the eager
# backend on a tiny Llama with int4 and LoRA; an artifact compiled on the GPU saved and loaded
# there), then benchmarks/kernels.py — bfloat16 on SmolLM2's
# and Llama-8B's shapes (SmolLM2's alone with GPU_CHECK_QUICK=1), then float32 on SmolLM2's — each
# step under its own time limit, so what finished comes back even if a later step runs out. Meant
# for the workplace's device tool:
#
#   here:   make gpu-wheels                  # lark, the one package the GPU image lacks, into .whl/
#   there:  bash benchmarks/gpu_check.sh     # run with carry [".whl"]; the log is $OUT/gpu_check.log
#
# At most 10 minutes (the step limits add up to 600 s); about 7 on an H200 on 2026-12-04
# (Inductor compiles and the first autotuning of each kernel source take most of it).
set -uo pipefail
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: installing .whl/ failed"; exit 1; }
fi
# The repository root is the package `slimfx` (pyproject.toml): import it through a link so named.
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/slimfx
export PYTHONPATH="/tmp/site:/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Real kernels, not Triton's interpreter (tests/conftest.py sets it unless told there is a GPU).
export SLIMFX_TRITON_GPU=1 TRITON_INTERPRET=0

python3 - <<'PY' || { echo "gpu_check: no usable GPU or slimfx does not import"; exit 1; }
import sys, torch, triton, transformers
import slimfx  # noqa: F401  (lark and the grammar load here)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(), f"({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
PY

status=0
step() {
    local limit=$1; shift
    echo; echo "== $* (at most ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== rc $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}
step 150 python3 -m pytest -q -p no:cacheprovider tests/codegen/test_dtypes.py tests/runtime/test_device.py -k on_a_gpu
if [ -z "${GPU_CHECK_QUICK:-}" ]; then
    step 270 python3 benchmarks/kernels.py --dtype bfloat16
else
    step 150 python3 benchmarks/kernels.py --quick --dtype bfloat16
fi
step 180 python3 benchmarks/kernels.py --quick --dtype float32
exit "$status"
