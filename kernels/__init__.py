"""Triton kernels of hdrq, installed as ``hdrq.kernels``. Importing this module registers them as the
"triton" implementations of the ``hdrq.ops`` custom ops. Nothing above ``hdrq.ops`` imports it."""
