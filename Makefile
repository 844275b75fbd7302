# Every target does its own set-up: a fresh machine needs only python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help setup test lint typecheck pytest wheel-test mindeps-test gpu-check demo bench docs clean
.DEFAULT_GOAL := help

# Each target's "## " comment is its line in `make help`.
help:  ## list the targets (a bare `make` does this)
	@grep -E '^[a-z-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | sed -E 's/^([a-z-]+):.*## /\1\t/' | expand -t 16

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	# timm's AGC is a test reference; its package needs torchvision, which has no
	# build for this CPU torch, so it comes without dependencies (the test loads agc.py).
	$(BIN)/python -m pip install -q --no-deps timm==1.0.31
	# The zclip package is the reference of agclip's ZClip (it needs only torch).
	$(BIN)/python -m pip install -q --no-deps zclip==1.0.0
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned CPU builds (every target does this first)

lint: $(STAMP)  ## ruff check and format check
	$(BIN)/ruff check agclip tests benchmarks examples demo
	$(BIN)/ruff format --check agclip tests benchmarks examples demo

typecheck: $(STAMP)  ## mypy
	$(BIN)/mypy

# Branch coverage of agclip, spawned processes included (pyproject's [tool.coverage]).
pytest: $(STAMP)  ## the test suite with branch coverage (AGCLIP_BACKENDS=... picks backends)
	$(BIN)/python -m pytest --cov --cov-report=term

# Lint, type checks, then the whole suite on every installed backend.
test: lint typecheck pytest  ## lint, type checks, then the whole suite (what CI runs first)

# Build the wheel, install it in a fresh venv and run the suite against it from
# outside the source tree: catches files missing from the package. Tests that
# need the source tree (demo, examples, docs, benchmark report) stay out.
WHEEL_DIR := build/wheel
wheel-test: $(STAMP)  ## the suite against the built wheel, from outside the source tree
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)/run
	$(BIN)/python -m pip wheel -q --no-deps -w $(WHEEL_DIR) .
	$(PY) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install -q -c constraints.txt "$$(ls $(WHEEL_DIR)/agclip-*.whl)[torch,jax,test]"
	cp -r tests pyproject.toml $(WHEEL_DIR)/run/
	cd $(WHEEL_DIR)/run && venv=../venv/bin/python && $$venv -c "import agclip, pathlib; p = pathlib.Path(agclip.__file__).parent; assert 'site-packages' in str(p) and (p / 'py.typed').exists(), p; print('testing the wheel installed at', p)" && $$venv -m pytest -q -p no:cacheprovider tests --ignore=tests/test_demo.py --ignore=tests/test_examples.py --ignore=tests/test_benchmark_report.py --ignore=tests/test_bench_adaptive.py --ignore=tests/test_bench_torch.py --ignore=tests/test_docs.py --ignore=tests/test_gpt_demo.py --ignore=tests/test_bench_gpt.py --ignore=tests/test_bench_jax_compile.py

# The suite on the lower bounds of pyproject.toml (constraints-min.txt), NumPy,
# array_api_strict and JAX backends; optax's own tests are tied to the pinned optax.
MIN_DIR := build/mindeps
mindeps-test:  ## the suite on the lowest supported NumPy, JAX and optax
	rm -rf $(MIN_DIR) && $(PY) -m venv $(MIN_DIR)/venv
	grep -v -E '^(numpy|array-api-compat|optree|array-api-strict|jax|jaxlib|optax)==' constraints.txt > $(MIN_DIR)/tools.txt
	$(MIN_DIR)/venv/bin/python -m pip install -q -c constraints-min.txt -c $(MIN_DIR)/tools.txt -e '.[jax,test]'
	AGCLIP_BACKENDS=numpy,array_api_strict,jax,jax_jit $(MIN_DIR)/venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/test_demo.py --ignore=tests/test_examples.py --ignore=tests/test_benchmark_report.py --ignore=tests/test_bench_adaptive.py --ignore=tests/test_bench_torch.py --ignore=tests/test_optax_suite.py --ignore=tests/test_gpt_demo.py --ignore=tests/test_bench_gpt.py --ignore=tests/test_bench_jax_compile.py

# On a machine with CUDA: the CUDA test cases (every backend test on torch_cuda,
# the no-sync, mixed-device and fused-step tests) and the PyTorch benchmark,
# whose CUDA rows and fused-step case print in one table. A few minutes.
gpu-check: $(STAMP)  ## on a CUDA machine: the CUDA tests and the PyTorch benchmark
	$(BIN)/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print(torch.cuda.get_device_name())"
	AGCLIP_BACKENDS=torch_cuda $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_core.py tests/test_hardening.py tests/test_properties.py
	$(BIN)/python -m pytest -q -p no:cacheprovider -rs tests/test_torch_adapter.py tests/test_clip_and_step.py tests/test_torch_compile.py tests/test_distributed.py -k "cuda or nccl"
	$(BIN)/python benchmarks/bench_torch.py --repeats 7

demo: $(STAMP)  ## the main job: training with and without clipping (python -m demo --help)
	$(BIN)/python -m demo

# Every speed/memory/accuracy/stability benchmark; regenerates docs/benchmarks.md (~50 min on 2 cores).
bench: $(STAMP)  ## every benchmark; regenerates docs/benchmarks.md
	$(BIN)/python benchmarks/run_all.py

# The documentation site (MkDocs + mkdocstrings); --strict turns broken references into errors.
docs: $(STAMP)  ## the documentation site, into site/
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:  ## remove .venv, site/ and tool caches
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
