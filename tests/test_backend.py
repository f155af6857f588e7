"""Backend selection: set_backend / HDRQ_BACKEND as registrations with the dispatcher, clear errors, inputs the
kernels do not take."""
import os
import subprocess
import sys

import pytest
import torch

import hdrq
from hdrq import ops
from hdrq import reference as ref


def test_set_backend_validates():
    with pytest.raises(ValueError, match="unknown hdrq backend 'gpu'"):
        hdrq.set_backend("gpu")
    with pytest.raises(ValueError, match="unknown hdrq backend 'cuda'"):
        hdrq.set_backend("cuda")  # the CUDA kernels are what "auto" runs on CUDA tensors
    for b in ("auto", "reference"):
        hdrq.set_backend(b)
        assert hdrq.get_backend() == b


def test_env_backend_registers_the_reference_for_cuda():
    code = ("import torch, hdrq; print(hdrq.get_backend(), "
            "torch._C._dispatch_has_kernel_for_dispatch_key('hdrq::int_matmul', 'CUDA'))")
    env = dict(os.environ, HDRQ_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "True"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreted case")
def test_triton_on_cpu_needs_interpreter():
    hdrq.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.fake_quant(torch.randn(4), torch.tensor(0.1), bits=4)


def test_available_backends():
    assert ops.available_backends("cpu")[:2] == ["auto", "reference"]
    assert ("triton" in ops.available_backends("cpu")) == (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels on CPU tensors")
def test_dtypes_the_kernels_do_not_take_run_the_reference():
    """float64 on the Triton backend: the wrappers hand it to the reference (same results, no error)."""
    hdrq.set_backend("triton")
    x, s = torch.randn(5, 3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    assert torch.equal(ops.fake_quant(x, s, bits=4, axis=1), ref.fake_quant(x, s, 4, True, 1))
    assert torch.equal(ops.quantize_per_tensor(x, torch.tensor([0.1]), bits=8),
                       ref.quantize_per_tensor(x, torch.tensor([0.1]), 8, True, 0))


def test_reference_backend_restores_auto_registrations():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    before = {op: has(f"hdrq::{op}", "CUDA") for op in ops._DEVICE_OPS}
    hdrq.set_backend("reference")
    assert all(has(f"hdrq::{op}", "CUDA") for op in ops._DEVICE_OPS)
    hdrq.set_backend("auto")
    assert {op: has(f"hdrq::{op}", "CUDA") for op in ops._DEVICE_OPS} == before
