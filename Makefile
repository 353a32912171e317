# discloss: set-up, build, test, benchmark and demo from a fresh clone.
#   make demo    train the end-to-end demo (the main job)
#   make test    C++ (ctest) and Python (pytest) tests; without a GPU the
#                CUDA tests run csrc/cuda on the CUDA simulator (tests/cudasim)
#   make test-cudasim-asan   the CUDA tests on the simulator built with
#                AddressSanitizer (out-of-bounds accesses of the CUDA kernels)
#   make bench   quick CPU benchmark against pure PyTorch
# Every target creates the virtual environment and builds the extension first.
#
# Another torch: make test-py TORCH=torch==2.4.0 (its own virtual environment,
# .venv-torch2.4.0, so that the default one stays as it is; VENV=... names
# another). USE_CUDA=0 builds the C++ sources only, PIP_ARGS is passed to pip
# (e.g. --index-url https://download.pytorch.org/whl/cpu for torch's CPU-only
# wheels).
#
# Installed copies (each in a fresh virtual environment under build/,
# from outside the source tree):
#   make install-check   sdist -> check its contents -> pip install --no-build-isolation -> smoke test
#   make test-installed  wheel -> pip install -> the whole pytest suite against the installed package
PYTHON ?= python3
DEFAULT_TORCH := torch==2.14.1
TORCH ?= $(DEFAULT_TORCH)
VENV ?= .venv$(if $(filter-out $(DEFAULT_TORCH),$(TORCH)),-$(subst =,,$(subst >,,$(subst <,,$(TORCH)))))
PY := $(VENV)/bin/python
PIP_ARGS ?=
DEPS := numpy pytest hypothesis expecttest ninja matplotlib scipy scikit-learn build wheel
PYTEST_ARGS ?=
# The package is used from the source tree (the extension is built in place).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: all venv build build-cudasim test test-cpp test-py test-cudasim-asan bench bench-full demo sdist wheel install-check test-installed clean FORCE

all: build

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(PIP_ARGS) "$(TORCH)" $(DEPS)
	touch $@

venv: $(VENV)/.deps

# The extension is built in place (discloss/_C*.so) with ninja, incrementally
# in build/temp: quick when nothing changed. USE_CUDA=0 / FORCE_CUDA=1 choose
# the CUDA sources (see setup.py). A change of virtual environment, torch or
# these settings starts the build afresh (build/.build-id records them).
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
BUILT := build/.built
BUILD_ID := $(abspath $(VENV)) $(TORCH) USE_CUDA=$(USE_CUDA) FORCE_CUDA=$(FORCE_CUDA) \
	TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) DISCLOSS_DEBUG=$(DISCLOSS_DEBUG)

build/.build-id: FORCE
	@mkdir -p build
	@echo '$(BUILD_ID)' | cmp -s - $@ || echo '$(BUILD_ID)' > $@

$(BUILT): $(VENV)/.deps build/.build-id $(SOURCES)
	$(if $(filter $(VENV)/.deps build/.build-id,$?),rm -rf build/temp build/lib.*)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace --build-temp build/temp
	@touch $@

build: $(BUILT)

test-cpp: venv
	bash scripts/cmake_check.sh $(PY) build/cmake

# The CUDA simulator's library (test-only, build/cudasim; ninja, incremental).
build-cudasim: venv
	$(PY) tests/cudasim/build.py

test-py: build build-cudasim
	DISCLOSS_CUDASIM_REBUILD=0 $(PY) -m pytest $(PYTEST_ARGS)

# AddressSanitizer needs its runtime first in the process: preloaded, with
# libstdc++ (python itself does not link it, and ASan's __cxa_throw
# interceptor must find it when it starts, or the first C++ exception aborts).
ASAN_RUNTIME = $(shell $${CXX:-c++} -print-file-name=libasan.so):$(shell $${CXX:-c++} -print-file-name=libstdc++.so.6)
ASAN_ENV = LD_PRELOAD=$(ASAN_RUNTIME) ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0
CUDASIM_ASAN_TESTS ?= tests/test_cudasim.py tests/test_cuda.py
test-cudasim-asan: build
	$(ASAN_ENV) $(PY) tests/cudasim/build.py --asan
	$(ASAN_ENV) DISCLOSS_CUDASIM_LIB=$(CURDIR)/build/cudasim-asan/discloss_cudasim_asan.so \
		$(PY) -m pytest -q $(CUDASIM_ASAN_TESTS) $(PYTEST_ARGS)

test: test-cpp test-py

bench: build
	$(PY) benchmarks/bench.py --quick

bench-full: build
	$(PY) benchmarks/bench.py --full

demo: build
	$(PY) -m discloss.demo

# Distributions, built without build isolation against the torch in $(VENV)
# (with isolation, pip would build against the newest torch instead).
sdist: venv
	$(PY) -m build --sdist --no-isolation --outdir dist .

wheel: venv
	$(PY) -m pip wheel --no-build-isolation --no-deps --wheel-dir dist .

install-check: venv
	bash scripts/install_check.sh $(PY) build/install-check

test-installed: venv
	bash scripts/install_check.sh --wheel --tests $(PY) build/test-installed

clean:
	rm -rf build dist *.egg-info discloss/_C*.so discloss/_build_info.py .pytest_cache

FORCE:
