import importlib
import os
import sys

import pytest
import torch

import hdrq


def _import_site_kernels() -> None:
    """The repository's top-level kernels/ folder (installed as ``hdrq.kernels``) shadows the PyPI package
    ``kernels`` that transformers imports, because the repository root is on sys.path (pytest's ``pythonpath``;
    the tests import ``examples``). Import the installed package first, with the root off the path, so that
    ``import kernels`` finds it in sys.modules from then on."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed (transformers absent, or older): nothing to shadow
        pass
    finally:
        sys.path[:] = saved


_import_site_kernels()

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
