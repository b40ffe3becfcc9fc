"""Shared test configuration: Hypothesis profiles and the --runslow option.

Profiles (select with HYPOTHESIS_PROFILE): ``ci`` (default: derandomized, bounded), ``dev`` (random seed),
``fuzz`` (thousands of examples; used by ``make fuzz``).

``--runslow`` runs the tests marked ``slow`` and gives the property tests that sample a large space their full
budget (``_helpers.budget``); the default run keeps every property with fewer examples. Tests must stay
xdist-safe (``make test`` runs ``-n auto``): files under ``tmp_path`` / ``tmp_path_factory`` only."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# At most 2 intra-op threads per test process; under pytest-xdist (``make test``: -n auto) the cores are shared
# by the workers, so each gets its share (one thread per worker on a 2-core machine).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# The repository root, so tests import the benchmark harnesses as modules (``from benchmarks import zoo``).
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run slow sweeps (full torchvision zoo, fuzz profile)")


def pytest_configure(config):
    """``--runslow`` also restores the full Hypothesis budgets that the default run samples (``_helpers.budget``);
    this runs before the test modules are imported, where the budgets are read."""
    import _helpers

    _helpers.FULL_BUDGETS = bool(config.getoption("--runslow"))


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow sweep: pass --runslow (make test-all)")
    skip_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (small models: faster, and immune to a busy machine); restored after.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
