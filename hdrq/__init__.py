"""hdrq: merge-friendly post-training quantization (HDRQ, ICML 2025) and deployment of merged
low-precision models, with Triton and CUDA kernels behind one op seam (``hdrq.ops``)."""
from . import ops, quant, reference
from .ops import get_backend, set_backend

__version__ = "0.1.0"
__all__ = ["ops", "quant", "reference", "set_backend", "get_backend", "__version__"]
