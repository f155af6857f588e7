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

.PHONY: setup test nvcc-check demo gpu-check clean

setup:
ifeq ($(CUDA_PY),)
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q setuptools wheel
	HDRQ_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation -e ".[test,plot,demo]"
else
	@# The machine's CUDA torch (and its triton) stay as they are: the other packages by name, only if missing.
	@$(PY) -c "import numpy, tqdm, safetensors, pytest, pytest_benchmark, scipy, sklearn, matplotlib, PIL" 2>/dev/null \
	  || $(PY) -m pip install -q numpy tqdm safetensors pytest pytest-benchmark scipy scikit-learn matplotlib pillow
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
endif

# Compile every CUDA source for sm_80 and sm_90a, so a CUDA compile error fails CI on a machine with no GPU.
nvcc-check:
ifneq ($(NVCC),)
	@mkdir -p build/nvcc-check
	@for f in $(CU_SOURCES); do \
	  echo "nvcc -c $$f"; \
	  $(NVCC) $(NVCC_FLAGS) -c $$f -o build/nvcc-check/$$(basename $$f .cu).o || exit 1; \
	done
else
	@echo "nvcc not found: skipping the CUDA compile check"
endif

test: setup nvcc-check
	$(TEST_ENV) $(PY) -m pytest -q tests

# The main job: the offline multi-target domain adaptation benchmark of merged low-bit models (hdrq demo).
# Uses the GPU when there is one. DEMO_ARGS passes options (e.g. DEMO_ARGS="--quick" or "--full").
demo: setup
	$(PY) -m hdrq demo $(DEMO_ARGS)

# The GPU check (build, cuda tests, sanitizer, benchmarks) on a GPU machine; OUT receives logs and JSON.
gpu-check:
	bash bench/gpu_check.sh $${OUT:-gpu-check-out}

clean:
	rm -rf $(VENV) build *.egg-info hdrq/_C*.so .pytest_cache .benchmarks
