"""The Triton kernels compiled for an H100 (sm_90) without a GPU: properties of the generated code that the
interpreter cannot show and that bit-exactness and speed depend on.

The wrappers of hdrq.kernels are called on CPU tensors with every kernel's launch replaced by a compile
for sm_90 that goes through Triton's own argument binding and specialisation (``_pack_args``: int
arguments equal to 1 become constants, pointers 16-byte aligned, seeds unspecialised), so what compiles
here is what a GPU launch of the same call compiles. Checked:

* every variant the wrappers launch compiles (each layout, constant-1 sizes, several chunks per channel,
  histogram mode, QDrop, two-pass per-token rows, and 64-bit indexing);
* no FMA in the PTX (``x + s*u`` must round twice, like the reference), no flush-to-zero, an IEEE 1/s and
  the round-half-even trick not folded away;
* the hot loads and stores are 16-byte vectors and the Philox lanes are joined in registers (no
  ``convert_layout`` in the TTGIR, which would go through shared memory);
* only integer atomics (the histogram), none in the ds reduction.

Needs Triton's NVIDIA backend and its bundled ptxas, no driver. Under TRITON_INTERPRET=1 ``@triton.jit``
gives interpreted functions that cannot be compiled, so the compiles then run in a subprocess without it
(this file run as a script).
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SM90 = (90, 32)


def calls():
    """name -> a function calling hdrq.kernels wrappers (CPU tensors; every launch only compiles)."""
    import torch

    from hdrq import reference as ref
    from hdrq.kernels import gemm as kg
    from hdrq.kernels import per_tensor as kpt2
    from hdrq.kernels import per_token as kpt
    from hdrq.kernels import quantizer as kq

    def quant(shape, axis, dtype, kinds, seed=5):
        def run():
            x = torch.randn(shape).to(dtype)
            s = torch.rand(1 if axis is None else shape[axis]).reshape(() if axis is None else -1) + 0.1
            for kind in kinds:
                if kind == "hard":
                    kq.fake_quant(x, s, 4, True, axis)
                    kq.fake_quant_backward(x, x, s, 4, True, axis)
                elif kind in ("uniform", "histogram"):
                    kq.noise_fake_quant(x, s, 4, False, axis, seed, kind)
                    kq.noise_fake_quant_backward(x, x, s, 4, False, axis, seed, kind)
                else:
                    kq.qdrop_fake_quant(x, s, 4, True, axis, seed, 0.5, kind == "qdrop_noise", "uniform")
                    kq.qdrop_fake_quant_backward(x, x, s, 4, True, axis, seed, 0.5, kind == "qdrop_noise",
                                                 "uniform")
        return run

    def gemm(m, n, k, bits, config):
        def run():
            q = torch.randint(-32, 32, (n, k), dtype=torch.int8)
            w = ref.pack_weight(q, bits)
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
            s_a, s_w = torch.rand(m) + 0.1, torch.rand(n) + 0.1
            kg.int_matmul(a, s_a, w, s_w, bits, torch.randn(n).bfloat16(), torch.bfloat16, config)
        return run

    return {
        "weight-fp32": quant((4096, 4096), 0, torch.float32, ("hard", "uniform", "qdrop_noise")),
        "weight-bf16": quant((4096, 4096), 0, torch.bfloat16, ("hard", "uniform", "qdrop_noise")),
        "weight-histogram": quant((256, 4096), 0, torch.float32, ("histogram",)),
        "act-per-tensor-bf16": quant((64, 4096), None, torch.bfloat16, ("qdrop_hard", "uniform")),
        "scalar-seed-1": quant((), None, torch.float16, ("uniform", "hard"), seed=1),  # constant-1 sizes
        "odd-unaligned": quant((100, 147), 0, torch.bfloat16, ("uniform", "qdrop_noise")),
        "last-axis": quant((9, 7), 1, torch.float32, ("uniform", "histogram")),  # layout 3, inner = 1
        "middle-axis": quant((4, 6, 32), 1, torch.float16, ("uniform",)),  # layout 2
        "per-token": lambda: kpt.quantize_per_token(torch.randn(64, 4096, dtype=torch.bfloat16), 8),
        "per-token-two-pass": lambda: kpt.quantize_per_token(torch.randn(3, 20000), 6),
        "uniform-noise": lambda: kq.uniform_noise([3, 5000], 2**40, "cpu"),
        "per-tensor": lambda: kpt2.quantize_per_tensor(torch.randn(64, 4096, dtype=torch.bfloat16),
                                                       torch.tensor([0.05]), 8, False, -128),
        # the Triton GEMM: a large-M tile (wgmma), a split-K decode tile (mma.sync, then the epilogue kernel), and
        # 6-bit weights (the expansion pass first); ragged N and K reach the edge loop
        "gemm-large": gemm(256, 1040, 1056, 8, kg.CANDIDATES[0]),
        "gemm-decode-w6": gemm(1, 1024, 2048, 6, kg.CANDIDATES[7]),
    }


def compile_launches(fn_call) -> list:
    """Run ``fn_call`` with every hdrq kernel's launch replaced by a compile; returns the launches as
    ``{"kernel", "signature", "ptx", "ttgir"}`` dicts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    from hdrq.kernels import gemm, per_tensor, per_token, quantizer

    target = GPUTarget("cuda", *SM90)
    backend = CUDABackend(target)
    out = []
    kernels = [k for m in (quantizer, per_token, per_tensor, gemm) for k in vars(m).values()
               if isinstance(k, triton.JITFunction)
               and k.fn.__name__.endswith("_kernel")]

    def fake_run(fn):
        binder = create_function_from_signature(fn.signature, fn.params, backend)

        def run(*args, grid, warmup, **kwargs):
            kwargs.setdefault("debug", False)
            bound, spec, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
            out.append({"kernel": fn.fn.__name__, "signature": str(signature), "ptx": ck.asm["ptx"],
                        "ttgir": ck.asm["ttgir"]})
        return run

    saved = {k: k.__dict__.get("run") for k in kernels}
    try:
        for k in kernels:
            k.run = fake_run(k)
        fn_call()
    finally:
        for k, r in saved.items():
            if r is None:
                del k.run
            else:
                k.run = r
    return out


def compile_idx64():
    """64-bit indexing needs a tensor of 2**31 elements to reach through a wrapper: compile the variants
    with an explicit signature instead."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hdrq.kernels import quantizer as kq
    from hdrq.kernels import runtime

    out = []
    types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*bf16", "dx_ptr": "*bf16", "scale_ptr": "*fp32",
             "ds_ptr": "*fp32", "hist_ptr": "*i32", "seed": "i64", "mseed": "i64", "p": "fp32", "qmin": "fp32",
             "qmax": "fp32", "plane": "i64", "inner": "i64", "cstride": "i64", "n_chunks": "i32"}
    for layout, aligned, vec in ((1, True, 8), (3, False, 4)):
        for fn in (kq._fwd_kernel, kq._bwd_kernel):
            meta = dict(BLOCK=4096, VEC=vec, LAYOUT=layout, ALIGNED=aligned, NOISE=1, QDROP=True, IDX64=True,
                        SOFT_BF16=False)
            sig = {a: ("constexpr" if a in meta else types[a]) for a in fn.arg_names}
            ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta), target=GPUTarget("cuda", *SM90),
                                options={"num_warps": 8, **runtime.LAUNCH_OPTIONS})
            out.append({"kernel": fn.fn.__name__, "signature": str(sig), "ptx": ck.asm["ptx"],
                        "ttgir": ck.asm["ttgir"]})
    return out


def compile_all() -> dict:
    res = {name: compile_launches(call) for name, call in calls().items()}
    res["idx64"] = compile_idx64()
    return res


@pytest.fixture(scope="module")
def asm(tmp_path_factory):
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
        from triton.runtime.jit import JITFunction
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    if not hasattr(JITFunction, "_pack_args"):
        pytest.skip("this Triton has no JITFunction._pack_args (written against triton 3.6 and 3.9)")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return compile_all()
    path = tmp_path_factory.mktemp("asm") / "asm.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(path.read_text())


def accesses(ptx: str) -> set:
    return set(re.findall(r"(?:ld|st)\.global(?:\.[a-z0-9]+)*", ptx))


def test_every_launch_compiles_without_fma_or_ftz(asm):
    assert set(asm) == set(calls()) | {"idx64"}
    kernels = {k["kernel"] for launches in asm.values() for k in launches}
    assert kernels == {"_fwd_kernel", "_bwd_kernel", "_sum_partials_kernel", "_hist_kernel", "_uniform_kernel",
                       "_per_token_kernel", "_per_tensor_kernel", "_gemm_kernel", "_epilogue_kernel",
                       "_unpack_units_kernel"}
    for name, launches in asm.items():
        assert launches, name
        for k in launches:
            ptx = k["ptx"]
            assert not re.search(r"\bfma\.rn(\.ftz)?\.f32", ptx), (name, k["kernel"], "FMA contraction")
            # tl.floor (the histogram bin) is cvt.rmi.ftz: a subnormal argument floors to 0 instead of -1 for
            # a negative one, and both clamp to bin 0, so that one is harmless. Any other ftz would not be.
            ftz = set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*", ptx)) - {"cvt.rmi.ftz.f32.f32"}
            assert not ftz, (name, k["kernel"], ftz)
            assert "div.approx" not in ptx and "rcp.approx" not in ptx, (name, k["kernel"])


@pytest.mark.parametrize("name", ["weight-fp32", "weight-bf16", "act-per-tensor-bf16"])
def test_hot_kernels_vectorised_without_layout_conversion(asm, name):
    launches = [k for k in asm[name] if k["kernel"] in ("_fwd_kernel", "_bwd_kernel")]
    assert len(launches) >= 4
    for k in launches:
        acc = accesses(k["ptx"])
        assert "ld.global.v4.b32" in acc and "st.global.v4.b32" in acc, (k["signature"], acc)  # 16-byte
        assert "convert_layout" not in k["ttgir"], k["signature"]  # Philox lanes joined in registers


@pytest.mark.parametrize("name,kernel", [("weight-fp32", "_fwd_kernel"), ("weight-bf16", "_bwd_kernel"),
                                         ("per-token", "_per_token_kernel")])
def test_rounding_and_reciprocal_survive_compilation(asm, name, kernel):
    """The round-half-even trick (+/- 1.5 * 2**23) must not be folded away, and 1/s must be IEEE division."""
    ptx = next(k["ptx"] for k in asm[name] if k["kernel"] == kernel and "0f4B400000" in k["ptx"])
    assert re.search(r"add\.rn\.f32\s+%r\w+, %r\w+, 0f4B400000", ptx)
    assert re.search(r"(add\.rn\.f32\s+%r\w+, %r\w+, 0fCB400000|sub\.rn\.f32\s+%r\w+, %r\w+, 0f4B400000)", ptx)
    assert "div.rn.f32" in ptx


def test_atomics_integer_only(asm):
    hist = [k["ptx"] for k in asm["weight-histogram"] if k["kernel"] == "_hist_kernel"]
    assert hist and all(re.search(r"\b(?:red|atom)\.global[.a-z]*\.add\.u32", p) for p in hist)
    for launches in asm.values():
        for k in launches:
            assert not re.search(r"\b(?:red|atom)[.a-z]*\.add\.f32", k["ptx"]), k["kernel"]
            if k["kernel"] == "_sum_partials_kernel":
                assert not re.search(r"\b(?:red|atom)\.", k["ptx"])  # fixed-order sum: reproducible


def test_per_token_vectorised(asm):
    for name in ("per-token", "per-token-two-pass"):
        for k in asm[name]:
            assert "ld.global.v4.b32" in accesses(k["ptx"]), name


def test_gemm_uses_the_tensor_cores_and_wide_loads(asm):
    """The large tile runs on Hopper's wgmma (s8 x s8 -> s32), the decode tile on mma.sync; operand tiles come in by
    16-byte asynchronous copies; the epilogue has no FMA (checked above for every launch)."""
    large = next(k for k in asm["gemm-large"] if k["kernel"] == "_gemm_kernel")
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", large["ptx"])
    decode = next(k for k in asm["gemm-decode-w6"] if k["kernel"] == "_gemm_kernel")
    # (.satfinite only matters past int32, which int8 products summed over K < 2**17 never reach)
    assert re.search(r"mma\.sync\.aligned\.m16n8k32\.row\.col(\.satfinite)?\.s32\.s8\.s8\.s32", decode["ptx"])
    for k in (large, decode):
        assert re.search(r"cp\.async\.(cg|ca)\.shared\.global(\.L2::\w+)?\s+\[[^]]+\], \[[^]]+\], (16|0x10)\b",
                         k["ptx"]) or "cp.async.bulk.tensor" in k["ptx"], k["signature"]
    kernels = {k["kernel"] for k in asm["gemm-decode-w6"]}
    assert {"_unpack_units_kernel", "_gemm_kernel", "_epilogue_kernel"} <= kernels  # expansion, split-K epilogue


def test_per_tensor_vectorised(asm):
    k = asm["per-tensor"][0]
    assert "ld.global.v4.b32" in accesses(k["ptx"]) and "div.rn.f32" in k["ptx"]


def test_seeds_are_never_specialised(asm):
    """Seeds (here 1 and 2**40) stay int64 arguments: no recompile per seed, no seed folded into the code."""
    for name in ("scalar-seed-1", "uniform-noise"):
        for k in asm[name]:
            if k["kernel"] in ("_fwd_kernel", "_bwd_kernel", "_uniform_kernel"):
                assert "'seed': 'i64'" in k["signature"], k["signature"]


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(compile_all(), f)
