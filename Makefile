# relkd developer entry points. `make test` and `make demo` work on a fresh
# machine (they install what is missing) and on one that already has torch
# and no network (they never replace the installed torch).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
NVCC ?= nvcc

.PHONY: deps test-deps demo-deps build test test-large demo bench bench-quick nvcc-check \
	cxx-test sanitize gpu-image-test clean

# What each target needs, installed only where missing. ninja compiles the
# C++ units in parallel (MAX_JOBS); the build works without it.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==$(TORCH_VERSION)
	@$(PYTHON) -c "import ninja" 2>/dev/null || $(PIP) install ninja || \
		echo "ninja could not be installed: the extension builds one unit at a time"

# The demo draws its ROC plot with matplotlib; tqdm shows progress (optional).
demo-deps: deps
	@$(PYTHON) -c "import matplotlib, tqdm" 2>/dev/null || $(PIP) install matplotlib tqdm

# The tests also run the demo's --quick mode end to end.
test-deps: demo-deps
	@$(PYTHON) -c "import pytest, hypothesis, numpy" 2>/dev/null || \
		$(PIP) install pytest hypothesis numpy

# relkd._C in place against the installed torch. The first build (and one
# after a version change) is an editable install, so that relkd is importable
# from anywhere with the right metadata; later ones recompile only what
# changed (ninja, build/ext; nvcc units are cached in build/relkd_cuda), and
# an unchanged tree is not rebuilt at all.
EXTENSION_SOURCES := setup.py pyproject.toml relkd/__init__.py $(shell find csrc -type f)
EXTENSION_STAMP := build/.extension-stamp
build: deps $(EXTENSION_STAMP)

$(EXTENSION_STAMP): $(EXTENSION_SOURCES)
	@if $(PYTHON) -P -c "import relkd, sys, importlib.metadata as m; sys.exit(relkd.__file__ != '$(CURDIR)/relkd/__init__.py' or m.version('relkd') != relkd.__version__)" 2>/dev/null; then \
		$(PYTHON) setup.py -q build_ext --inplace --build-temp build/ext; \
	else \
		$(PIP) install --no-build-isolation --no-deps -e .; \
	fi
	@mkdir -p build && touch $@

test: test-deps build
	$(PYTHON) -m pytest tests

# Scale tests beyond 32-bit pair counts (minutes each; not part of CI).
test-large: test-deps build
	$(PYTHON) -m pytest tests/test_large.py --run-large -v

demo: demo-deps build
	$(PYTHON) -m relkd.demo

bench: build
	mkdir -p bench-output && $(PYTHON) benchmarks/bench.py --json bench-output/latest-cpu.json

bench-quick: build
	$(PYTHON) benchmarks/bench.py --quick

# ptxas' register / spill report of every CUDA kernel (sm_80 and sm_90), the
# units compiled as the build compiles them (`make build` already compiles
# them whenever a CUDA toolkit is found, GPU or not).
nvcc-check:
	@command -v $(NVCC) >/dev/null || { echo "nvcc-check: nvcc not found"; exit 1; }
	@for src in $(CUDA_SOURCES); do \
		echo "== $$src"; \
		$(NVCC) -std=c++17 -O3 -Icsrc -Xptxas -v -gencode arch=compute_80,code=sm_80 \
			-gencode arch=compute_90,code=sm_90 -c $$src -o /tmp/relkd-$$(basename $$src).o \
			|| exit 1; \
	done

# Developer build of the same extension against libtorch with CMake, and its
# C++ test (the hook for sanitizer builds).
cxx-test: deps
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build cmake-build -j 2
	cd cmake-build && ctest --output-on-failure

# The extension built with AddressSanitizer + UndefinedBehaviorSanitizer into
# build/sanitize (the in-place build is untouched), a representative test
# subset run against it (every op at tile boundaries, labels, ids, padding,
# k > M, DDP shards; fewer hypothesis examples), then the C++ test built with
# the same sanitizers. Python itself is not instrumented: the ASan runtime is
# preloaded. Any report fails the run (UBSan: -fno-sanitize-recover).
SANITIZE_DIR := build/sanitize
SANITIZE_TESTS := tests/test_tile_boundaries.py tests/test_topk_sim.py tests/test_pair_dot.py \
	tests/test_pair_select.py tests/test_pairwise_loss.py tests/test_losses_fused.py \
	tests/test_normalize.py tests/test_sp_gram.py tests/test_relation_penalty.py \
	"tests/test_distributed.py::test_shares_sum_to_the_global_loss" \
	"tests/test_distributed.py::test_selection_collects_keys_across_ranks"
SANITIZE_RUNTIME = $$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)
sanitize: test-deps
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	RELKD_SANITIZE=1 RELKD_CUDA=0 $(PYTHON) setup.py -q build_ext --build-lib $(SANITIZE_DIR) \
		--build-temp $(SANITIZE_DIR)/tmp
	cp relkd/*.py $(SANITIZE_DIR)/relkd/
	PYTHONPATH=$(SANITIZE_DIR) LD_PRELOAD="$(SANITIZE_RUNTIME)" ASAN_OPTIONS=detect_leaks=0 \
		$(PYTHON) -P -c "import relkd, relkd._C as c; assert '$(SANITIZE_DIR)' in c.__file__, c.__file__; print('sanitized extension:', c.__file__)"
	LD_PRELOAD="$(SANITIZE_RUNTIME)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1 HYPOTHESIS_PROFILE=sanitize \
		PYTHONPATH=$(SANITIZE_DIR) $(PYTHON) -P -m pytest -p no:cacheprovider -q \
		$(SANITIZE_TESTS)
	cmake -S . -B cmake-build-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRELKD_SANITIZE=ON \
		-DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build cmake-build-sanitize -j 2
	cd cmake-build-sanitize && ASAN_OPTIONS=detect_leaks=0 ctest --output-on-failure

# The GPU machine's image has torch 2.11.0+cu130 and nvcc 13.0 (CI: 2.13.0,
# CPU). A fresh clone built and tested, on this CPU, in a virtual environment
# with that torch (PyPI's CUDA build, ~5 GB with its nvidia-* wheels), so that
# an API newer than 2.11 fails here and not in a GPU session's short device
# time. Not in CI (the download); run it before a GPU session.
GPU_IMAGE_TORCH ?= 2.11.0
GPU_IMAGE_DIR ?= /tmp/relkd-gpu-image-test
gpu-image-test:
	rm -rf $(GPU_IMAGE_DIR) && mkdir -p $(GPU_IMAGE_DIR)
	$(PYTHON) -m venv $(GPU_IMAGE_DIR)/venv
	$(GPU_IMAGE_DIR)/venv/bin/pip install -q torch==$(GPU_IMAGE_TORCH) numpy pytest hypothesis \
		matplotlib tqdm ninja setuptools wheel
	git clone -q . $(GPU_IMAGE_DIR)/src
	$(MAKE) -C $(GPU_IMAGE_DIR)/src test PYTHON=$(GPU_IMAGE_DIR)/venv/bin/python
	cd $(GPU_IMAGE_DIR)/src && $(GPU_IMAGE_DIR)/venv/bin/python -m relkd

clean:
	rm -rf build cmake-build cmake-build-sanitize relkd/_C*.so *.egg-info bench-output
