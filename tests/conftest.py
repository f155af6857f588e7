import os

import pytest
import torch

import hdrq


HAS_CUDA = torch.cuda.is_available()

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves
    pass
else:
    # "ci" (default): a fixed set of examples (derandomized, no example database on disk), sized for 2 cores.
    # HYPOTHESIS_PROFILE=dev explores: more examples, fresh ones on every run.
    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=80, deadline=None, derandomize=True, database=None,
                              suppress_health_check=_quiet)
    settings.register_profile("dev", max_examples=500, deadline=None, suppress_health_check=_quiet)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_configure(config):
    # One intra-op thread for the whole run: the tests' tensors are small, and on a shared or loaded CPU the
    # pool's threads spin-wait for each other (a test costing 9 s on one thread took 150 s of CPU on two).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts on the "auto" backend and leaves it there."""
    hdrq.set_backend("auto")
    yield
    hdrq.set_backend("auto")


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g
