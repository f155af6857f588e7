"""Backend selection: set_backend / HDRQ_BACKEND, clear errors, fallback on unsupported inputs."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import hdrq
from hdrq import ops


def test_set_backend_validates():
    with pytest.raises(ValueError, match="unknown hdrq backend 'gpu'"):
        hdrq.set_backend("gpu")
    for b in ("auto", "reference", "triton", "cuda"):
        hdrq.set_backend(b)
        assert hdrq.get_backend() == b


def test_env_backend():
    code = "import hdrq; print(hdrq.get_backend())"
    env = dict(os.environ, HDRQ_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_named_backend_unavailable_raises():
    hdrq.set_backend("cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        ops.fake_quant(torch.randn(4), torch.tensor(0.1), bits=4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreted case")
def test_triton_on_cpu_needs_interpreter():
    hdrq.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.fake_quant(torch.randn(4), torch.tensor(0.1), bits=4)


def test_auto_on_cpu_is_reference():
    assert ops._select("fake_quant", torch.device("cpu"))[0] == "reference"
    assert "reference" in hdrq.ops.available_backends("cpu")


def test_unsupported_falls_back_once_with_warning(monkeypatch):
    calls = []

    def picky(x, scale, bits, signed, axis):
        calls.append(1)
        raise ops.Unsupported("float64 is not supported")

    monkeypatch.setitem(ops._IMPLS["triton"], "fake_quant", picky)
    monkeypatch.setattr(ops, "_unavailable_reason", lambda b, d: None)
    monkeypatch.setattr(ops, "_WARNED", set())
    hdrq.set_backend("triton")
    x, s = torch.randn(5, dtype=torch.float64), torch.tensor(0.2)
    with pytest.warns(RuntimeWarning, match="float64 is not supported"):
        y = ops.fake_quant(x, s, bits=4)
    assert torch.equal(y, hdrq.reference.fake_quant(x, s, 4, True, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.fake_quant(x, s, bits=4)  # second time: no warning
    assert len(calls) == 2


def test_named_backend_without_op_uses_auto(monkeypatch):
    monkeypatch.setattr(ops, "_unavailable_reason", lambda b, d: None)
    monkeypatch.setattr(ops, "_WARNED", set())
    monkeypatch.setitem(ops._IMPLS, "cuda", {})
    hdrq.set_backend("cuda")
    with pytest.warns(RuntimeWarning, match="no implementation of pack_int6"):
        p = ops.pack_int6(torch.zeros(2, 4, dtype=torch.int8))
    assert p.shape == (2, 3)
