"""Suite-wide settings. Hypothesis runs a fixed, smaller budget in CI so the suite stays fast
and reproducible; locally it explores with fresh randomness."""
import gc
import os

import pytest
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


# Most tests compile a fresh tiny model whose trace another test's model of the same build
# already has: re-bound instead of traced again (capture_cache.share_traces; users opt in the
# same way), the suite takes 10-14 minutes instead of 40. tests/passes/test_capture_cache.py checks
# that a re-bound trace computes as a fresh one, and what is never shared. (Imported here, after
# TRITON_INTERPRET is set above.)
from slimfx.passes.capture_cache import share_traces  # noqa: E402

share_traces(True)


# compile() ends with a full garbage collection (runtime/heap.py: the freed heap goes back to the
# system, so RSS shows what the model holds). Its cost grows with every object the process holds:
# in a test process, with torch, transformers, hypothesis and earlier tests' modules imported,
# 0.35 s a compile, 40% of tests/test_api.py's time (measured). Objects that live across tests
# are moved out of the collector's sight (gc.freeze): what collecting the tests and a first
# capture imported, then at each test module's end what is left after a full collection, so a
# compile's collection looks only at what its module made; that full collection frees what the
# module left in cycles.
@pytest.fixture(autouse=True, scope="session")
def _out_of_sight_what_collection_imported():
    # torch.export imports most of its machinery (dynamo, functorch, sympy) on its first call:
    # one capture here puts those objects out of sight too
    from slimfx.models import tiny
    from slimfx.passes.capture import capture
    from slimfx.passes.capture_cache import clear_cache

    warm = tiny("llama", layers=1)
    capture(warm.model, warm.example_inputs)
    del warm
    clear_cache()
    gc.collect()
    gc.freeze()
    yield
    # frozen objects are never collected, at exit neither: triton's bindings then report leaks
    gc.unfreeze()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _collect_what_each_module_leaves(_out_of_sight_what_collection_imported):
    yield
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models run in milliseconds on one thread; two threads on a busy 2-core machine spin for
    ~0.3 s per forward."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
