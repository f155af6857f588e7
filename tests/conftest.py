import os
import sys

# The repository's top-level kernels/ folder (installed as hdrq.kernels) shadows the PyPI package `kernels`
# that transformers imports whenever the repository root is on sys.path, as `python -m pytest` run from the
# root puts it. hdrq itself is imported from its installation, so the root is taken off the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

import hdrq  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
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
