"""Suite-wide settings. Hypothesis runs a fixed, smaller budget in CI so the suite stays fast
and reproducible; locally it explores with fresh randomness."""
import os

from hypothesis import HealthCheck, settings

# Generated Triton kernels run through Triton's interpreter on a machine without a GPU; the
# variable is read when triton is first imported, so it is set before any test imports it.
if not os.environ.get("SLIMFX_TRITON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Under pytest-xdist every worker is a process with torch's default of one thread per core: with
# `-n 2` on 2 cores that is 4 busy threads fighting for 2 cores, and tiny models (most of the
# suite) spend more time in that contention than in their work (measured: a tiny BERT forward
# 0.35 s with 2 threads on a busy machine, 2 ms with 1). Give each worker its share of the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
