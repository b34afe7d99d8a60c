# relkd developer entry points. `make test` and `make demo` work on a fresh
# machine (they install what is missing) and on one that already has torch
# and no network (they never replace the installed torch).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
NVCC ?= nvcc

.PHONY: deps build test demo bench bench-quick nvcc-check cxx-test clean

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==$(TORCH_VERSION)
	@$(PYTHON) -c "import pytest, hypothesis, numpy" 2>/dev/null || \
		$(PIP) install pytest hypothesis numpy
	@$(PYTHON) -c "import matplotlib, tqdm" 2>/dev/null || $(PIP) install matplotlib tqdm

# Builds relkd._C in place against the installed torch (see DESIGN/README:
# never an isolated build, which would fetch another torch).
build: deps
	$(PIP) install --no-build-isolation --no-deps -e .

test: build nvcc-check
	$(PYTHON) -m pytest tests

demo: build
	$(PYTHON) -m relkd.demo

bench: build
	$(PYTHON) benchmarks/bench.py --json benchmarks/results/latest-cpu.json

bench-quick: build
	$(PYTHON) benchmarks/bench.py --quick

# Every CUDA kernel unit must compile for sm_80 and sm_90 (CI has nvcc but no
# GPU); -Xptxas -v prints the register/spill report.
nvcc-check:
ifeq ($(strip $(CUDA_SOURCES)),)
	@echo "nvcc-check: no CUDA sources (csrc/cuda/*.cu) yet"
else
	@command -v $(NVCC) >/dev/null || { echo "nvcc-check: nvcc not found, skipped"; exit 0; }; \
	for src in $(CUDA_SOURCES); do \
		$(NVCC) -std=c++17 -O3 -Xptxas -v -gencode arch=compute_80,code=sm_80 \
			-gencode arch=compute_90,code=sm_90 -c $$src -o /tmp/$$(basename $$src).o || exit 1; \
	done
endif

# Developer build of the same extension against libtorch with CMake, and its
# C++ test (the hook for sanitizer builds).
cxx-test: deps
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build cmake-build -j 2
	cd cmake-build && ctest --output-on-failure

clean:
	rm -rf build cmake-build relkd/_C*.so *.egg-info
