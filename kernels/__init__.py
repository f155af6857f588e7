"""Triton kernels of hdrq, installed as ``hdrq.kernels``. Importing this module registers them as the
"triton" implementations of the ``hdrq.ops`` custom ops. Nothing above ``hdrq.ops`` imports it.

  quantizer.py   fake_quant, noise_fake_quant (uniform / histogram noise), qdrop_fake_quant: forward and
                 backward, in-kernel Philox noise; uniform_noise (the noise source, for tests)
  per_token.py   quantize_per_token (deploy-side activation quantization)
  runtime.py     output allocation, dtype checks, launch options shared by the kernels
"""
from hdrq.ops import register_impl

from . import per_token, quantizer

_IMPLS = {
    "fake_quant": quantizer.fake_quant,
    "fake_quant_backward": quantizer.fake_quant_backward,
    "noise_fake_quant": quantizer.noise_fake_quant,
    "noise_fake_quant_backward": quantizer.noise_fake_quant_backward,
    "qdrop_fake_quant": quantizer.qdrop_fake_quant,
    "qdrop_fake_quant_backward": quantizer.qdrop_fake_quant_backward,
    "uniform_noise": quantizer.uniform_noise,
    "quantize_per_token": per_token.quantize_per_token,
}

for _op, _fn in _IMPLS.items():
    register_impl(_op, "triton", _fn)
