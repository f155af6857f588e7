"""hdrq: merge-friendly post-training quantization (HDRQ, ICML 2025) and deployment of merged
low-precision models, with Triton and CUDA kernels behind one op seam (``hdrq.ops``).

The public names are imported lazily (``import hdrq`` stays fast and never imports Triton):

    hdrq.ops, hdrq.set_backend, hdrq.QuantConfig, hdrq.quantize, hdrq.merge, hdrq.error_barrier,
    hdrq.convert, hdrq.save, hdrq.load, hdrq.nn, hdrq.analysis
"""
import importlib

from . import ops, quant, reference
from .ops import get_backend, set_backend

__version__ = "0.1.0"

# public name -> the module that defines it (a module itself where the name is a submodule)
_LAZY = {
    "QuantConfig": "hdrq.calib",
    "quantize": "hdrq.calib",
    "merge": "hdrq.merge",
    "error_barrier": "hdrq.analysis",
    "convert": "hdrq.deploy",
    "save": "hdrq.deploy",
    "load": "hdrq.deploy",
    "calib": None,
    "analysis": None,
    "nn": None,
    "deploy": None,
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'hdrq' has no attribute {name!r}")
    owner = _LAZY[name]
    if owner is None:
        return importlib.import_module(f"hdrq.{name}")
    return getattr(importlib.import_module(owner), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["ops", "quant", "reference", "set_backend", "get_backend", "__version__", *_LAZY]
