"""The Llama benchmark's pipeline on the CPU: a tiny converted decoder compiles with fullgraph=True (no graph break
from hdrq layers), generates through transformers' generate, and gives the uncompiled model's tokens. Run as a
script (as on the GPU), so that the repository's top-level ``kernels/`` folder (installed as ``hdrq.kernels``)
cannot shadow the ``kernels`` package transformers probes for."""
import ast
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_converted_llama_compiles_and_generates():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_llama.py"), "--tiny"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert result == {f"{name} {what}": (0 if what == "graph breaks" else True)
                      for name in ("W6A6",) for what in ("graph breaks", "tokens equal")}
