"""Build of hdrq: the Python package (the Triton kernels in ``hdrq.kernels`` included) and,
where a CUDA build of torch and nvcc are present, the CUDA extension ``hdrq._C`` from csrc/.

HDRQ_BUILD_CUDA=1 forces the extension (and fails loudly without CUDA), HDRQ_BUILD_CUDA=0 skips it;
unset, it is built when torch has CUDA and nvcc is found. The project metadata lives in pyproject.toml.
"""
import glob
import os

from setuptools import find_packages, setup

# Only the architectures the kernels are written for: sm_80 (mma.sync path) and sm_90a (Hopper; wgmma needs
# the "a" target, which must be spelled as -gencode with CUDA 13.0).
NVCC_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def cuda_extension():
    flag = os.environ.get("HDRQ_BUILD_CUDA", "")
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if flag == "0" or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("HDRQ_BUILD_CUDA=1 but torch is not importable in the build environment "
                               "(install with --no-build-isolation)")
        return [], {}
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if not has_cuda:
        if flag == "1":
            raise RuntimeError(f"HDRQ_BUILD_CUDA=1 but torch {torch.__version__} has no CUDA or nvcc was not "
                               f"found (CUDA_HOME={CUDA_HOME})")
        return [], {}
    ext = CUDAExtension(
        "hdrq._C",
        sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", *NVCC_ARCH_FLAGS],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    packages=find_packages(include=["hdrq", "hdrq.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
