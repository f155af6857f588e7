"""The Triton kernels compiled for an H100 (sm_90) without a GPU: properties of the generated code that the
interpreter cannot show and that bit-exactness and speed depend on.

* no FMA in the PTX (``x + s*u`` must round twice, like the reference) and no flush-to-zero;
* the hot loads and stores are 16-byte vectors (``ld.global.v4.b32``) for fp32 and bf16;
* the Philox lanes are joined into element order inside registers: no ``convert_layout`` in the TTGIR of
  the uniform / hard kernels (a conversion would go through shared memory);
* every variant the wrappers can launch (each LAYOUT, 64-bit indexing, histogram mode) compiles.

Triton compiles for a named target with its bundled ptxas; no driver is needed. Under TRITON_INTERPRET=1
``@triton.jit`` gives interpreted functions that cannot be compiled, so the variants are then compiled in
a subprocess without it (this file run as a script).
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SM90 = (90, 32)


def _quant_types(dt: str, idx64: bool = False) -> dict:
    i = "i64" if idx64 else "i32"
    return {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "g_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "scale_ptr": "*fp32",
            "ds_ptr": "*fp32", "hist_ptr": "*i32", "seed": "i64", "mseed": "i64", "p": "fp32", "qmin": "fp32",
            "qmax": "fp32", "plane": i, "inner": i, "cstride": i, "n_chunks": "i32"}


def _quant_meta(vec, layout=1, aligned=True, noise=1, qdrop=False, idx64=False, block=4096):
    return dict(BLOCK=block, VEC=vec, LAYOUT=layout, ALIGNED=aligned, NOISE=noise, QDROP=qdrop, IDX64=idx64,
                SOFT_BF16=False)


def variants() -> dict:
    """name -> (module, kernel, argument types, constexprs, num_warps)."""
    v = {}
    for dt, vec in (("fp32", 4), ("bf16", 8)):
        for kind, noise, qdrop in (("hard", 0, False), ("uniform", 1, False), ("qdrop", 1, True)):
            for k in ("fwd", "bwd"):
                v[f"hot-{dt}-{k}-{kind}"] = ("quantizer", f"_{k}_kernel", _quant_types(dt),
                                             _quant_meta(vec, noise=noise, qdrop=qdrop), 8)
    for layout, aligned, vec in ((0, True, 8), (1, False, 4), (2, True, 4), (3, False, 4)):
        for idx64 in (False, True):
            for k in ("fwd", "bwd"):
                v[f"layout{layout}-{'i64' if idx64 else 'i32'}-{k}"] = (
                    "quantizer", f"_{k}_kernel", _quant_types("bf16", idx64),
                    _quant_meta(vec, layout, aligned, noise=1, qdrop=True, idx64=idx64, block=1024), 4)
    for k in ("fwd", "bwd"):
        v[f"histogram-{k}"] = ("quantizer", f"_{k}_kernel", _quant_types("fp32"),
                               _quant_meta(4, noise=2, block=2048), 8)
    v["hist-counts"] = ("quantizer", "_hist_kernel",
                        {"x_ptr": "*fp32", "scale_ptr": "*fp32", "hist_ptr": "*i32", "qmin": "fp32", "qmax": "fp32",
                         "plane": "i32", "inner": "i32", "cstride": "i32", "n_chunks": "i32"},
                        dict(BLOCK=4096, VEC=4, LAYOUT=1, ALIGNED=True, IDX64=False), 8)
    v["sum-partials"] = ("quantizer", "_sum_partials_kernel",
                         {"part_ptr": "*fp32", "ds_ptr": "*fp32", "C": "i32", "n_chunks": "i32"}, dict(CB=2, RB=1024),
                         4)
    v["uniform-noise"] = ("quantizer", "_uniform_kernel", {"out_ptr": "*fp32", "seed": "i64", "n": "i32"},
                          dict(BLOCK=4096, IDX64=False), 8)
    for one_pass in (True, False):
        v[f"per-token-{'one' if one_pass else 'two'}-pass"] = (
            "per_token", "_per_token_kernel",
            {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "M": "i32", "K": "i32", "stride_m": "i32",
             "qmax": "fp32"},
            dict(BM=1, BK=4096 if one_pass else 2048, ONE_PASS=one_pass, IDX64=False), 8)
    return v


def compile_all() -> dict:
    """name -> {"ptx", "ttgir"} for every variant, compiled for sm_90 with the wrappers' launch options;
    pointers 16-byte aligned and i32 arguments divisible by 16, as Triton specialises them for torch tensors
    of round sizes."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hdrq.kernels import runtime

    out = {}
    for name, (module, kernel, types, constexprs, num_warps) in variants().items():
        fn = getattr(importlib.import_module(f"hdrq.kernels.{module}"), kernel)
        signature, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in constexprs:
                signature[arg] = "constexpr"
                continue
            signature[arg] = types[arg]
            if types[arg].startswith("*") or types[arg] == "i32":
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", *SM90),
                            options={"num_warps": num_warps, **runtime.LAUNCH_OPTIONS})
        out[name] = {"ptx": ck.asm["ptx"], "ttgir": ck.asm["ttgir"]}
    return out


@pytest.fixture(scope="module")
def asm(tmp_path_factory):
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return compile_all()
    path = tmp_path_factory.mktemp("asm") / "asm.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(path.read_text())


def check_arithmetic(ptx: str) -> None:
    assert not re.search(r"\bfma\.rn(\.ftz)?\.f32", ptx), "FMA contraction would change the rounding of x + s*u"
    # tl.floor (the histogram bin) is cvt.rmi.ftz: a subnormal argument floors to 0 instead of -1 for a
    # negative one, and both then clamp to bin 0, so that one is harmless. Any other ftz would not be.
    ftz = set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*", ptx)) - {"cvt.rmi.ftz.f32.f32"}
    assert not ftz, f"flush-to-zero would change results on subnormal inputs: {ftz}"


def accesses(ptx: str) -> set:
    return set(re.findall(r"(?:ld|st)\.global(?:\.[a-z0-9]+)*", ptx))


def test_every_variant_compiles_without_fma_or_ftz(asm):
    assert set(asm) == set(variants())
    for name, a in asm.items():
        if name != "sum-partials":
            check_arithmetic(a["ptx"])


@pytest.mark.parametrize("name", [n for n in variants() if n.startswith("hot-")])
def test_hot_kernels_vectorised_without_layout_conversion(asm, name):
    ptx, ttgir = asm[name]["ptx"], asm[name]["ttgir"]
    acc = accesses(ptx)
    assert "ld.global.v4.b32" in acc, acc  # 16-byte loads of x (and g)
    assert "st.global.v4.b32" in acc, acc  # 16-byte stores of y / dx
    assert "convert_layout" not in ttgir, "the Philox lanes should be joined in registers"


@pytest.mark.parametrize("name", ["hot-fp32-fwd-hard", "hot-bf16-bwd-hard", "per-token-one-pass"])
def test_rounding_and_reciprocal_survive_compilation(asm, name):
    """The round-half-even trick (+/- 1.5 * 2**23) must not be folded away, and 1/s must be an IEEE division."""
    ptx = asm[name]["ptx"]
    assert re.search(r"add\.rn\.f32\s+%r\w+, %r\w+, 0f4B400000", ptx), "|v| + 1.5*2**23 was folded away"
    assert re.search(r"(add\.rn\.f32\s+%r\w+, %r\w+, 0fCB400000|sub\.rn\.f32\s+%r\w+, %r\w+, 0f4B400000)",
                     ptx), "the - 1.5*2**23 was folded away"
    assert "div.rn.f32" in ptx and "div.approx" not in ptx and "rcp.approx" not in ptx


def test_histogram_uses_integer_atomics_only(asm):
    ptx = asm["hist-counts"]["ptx"]
    assert re.search(r"\b(?:red|atom)\.global[.a-z]*\.add\.u32", ptx)
    assert not re.search(r"\b(?:red|atom)[.a-z]*\.add\.f32", ptx)
    assert not re.search(r"\b(?:red|atom)\.", asm["sum-partials"]["ptx"])  # fixed-order sum: reproducible


def test_per_token_vectorised(asm):
    for name in ("per-token-one-pass", "per-token-two-pass"):
        assert "ld.global.v4.b32" in accesses(asm[name]["ptx"]), name  # 8 bf16 per load


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(compile_all(), f)
