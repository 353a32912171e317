# discloss: set-up, build, test, benchmark and demo from a fresh clone.
#   make demo    train the end-to-end demo (the main job)
#   make test    C++ (ctest) and Python (pytest) tests
#   make bench   quick CPU benchmark against pure PyTorch
# Every target creates the virtual environment and builds the extension first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
DEPS := numpy pytest hypothesis expecttest ninja matplotlib scipy scikit-learn
PYTEST_ARGS ?=
# The package is used from the source tree (the extension is built in place).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: all venv build test test-cpp test-py bench bench-full demo clean

all: build

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q "$(TORCH)" $(DEPS)
	touch $@

venv: $(VENV)/.deps

# The extension is built in place (discloss/_C*.so) with ninja, incrementally
# in build/temp: quick when nothing changed. USE_CUDA=0 / FORCE_CUDA=1 choose
# the CUDA sources (see setup.py); after changing them, `make clean`.
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
BUILT := build/.built

$(BUILT): $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace --build-temp build/temp
	@mkdir -p build && touch $@

build: $(BUILT)

test-cpp: venv
	bash scripts/cmake_check.sh $(PY) build/cmake

test-py: build
	$(PY) -m pytest $(PYTEST_ARGS)

test: test-cpp test-py

bench: build
	$(PY) benchmarks/bench.py --quick

bench-full: build
	$(PY) benchmarks/bench.py --full

demo: build
	$(PY) -m discloss.demo

clean:
	rm -rf build dist *.egg-info discloss/_C*.so .pytest_cache
