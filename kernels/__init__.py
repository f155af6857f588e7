"""Triton kernels of hdrq, installed as ``hdrq.kernels``. ``hdrq.ops`` registers their wrappers as the CUDA
kernels of its ops (and, for tests, as the CPU kernels under the Triton interpreter); nothing above
``hdrq.ops`` imports this package.

  quantizer.py   fake_quant, noise_fake_quant (uniform / histogram noise), qdrop_fake_quant: forward and
                 backward, in-kernel Philox noise; uniform_noise (the noise source)
  per_token.py   quantize_per_token (dynamic activation quantization)
  per_tensor.py  quantize_per_tensor (static activation quantization)
  gemm.py        int_matmul / int_matmul_int32: the int8 GEMM with the epilogue fused; the weight-layout
                 passes (6 -> 8 bit expansion, row-major) and torch._int_mm with the epilogue
  runtime.py     output allocation, dtypes, launch options shared by the kernels
"""
