# Needs only python3 (>= 3.11) and make; everything else is installed into .venv (the lock) or .venv-latest.
SHELL := /bin/bash
PYTHON ?= python3
LOCK := constraints.txt
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST := .venv-latest
LPY := $(LATEST)/bin/python
OLDEST := .venv-oldest
OPY := $(OLDEST)/bin/python
# The oldest releases pyproject.toml admits where tracing differs: the GPU machine's torch and transformers.
OLDEST_PINS := torch==2.11.0 torchvision==0.26.0 transformers==5.17.0
# The targets choose the releases themselves (the lock, the newest, the oldest): a machine-wide pip constraint file
# (the CPU machines cap torch at 2.14.1 in /etc/xdg/pip) would silently hold test-latest back, so none applies here.
export PIP_CONSTRAINT := /dev/null
# A pytest-xdist worker per core, each taking whole test files, so that a module-scoped fixture (timm's own test
# run, an installed wheel, a trained LoRA) is built once. (--dist loadgroup does not group under pytest 9.2, whose
# node ids no longer read the `_nodeid` that xdist 3.8 suffixes with the group.)
PYTEST := -m pytest -q -ra -n auto --dist loadfile tests
FREEZE := -m pip freeze --all --exclude-editable

.PHONY: venv test test-gpu test-latest test-oldest lock demo bench clean

venv: $(STAMP)

# Rebuilt from scratch when pyproject.toml or the lock change, so that .venv holds the lock's releases and nothing
# else; a release the lock does not pin (a new dependency) stops the build.
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "mmattn needs Python >= 3.11 ($(PYTHON) is older)" >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	$(VPY) -m pip install -q -c $(LOCK) --upgrade pip
	$(VPY) -m pip install -c $(LOCK) -e ".[all,test]"
	@unpinned=$$(LC_ALL=C comm -13 <(grep -v '^#' $(LOCK) | LC_ALL=C sort) <($(VPY) $(FREEZE) | LC_ALL=C sort)); \
		test -z "$$unpinned" || { echo "$(LOCK) does not pin: $$unpinned (run make lock)" >&2; exit 1; }
	touch $@

test: venv
	TRITON_INTERPRET=1 $(VPY) $(PYTEST)

# Every GPU test (pytest marker gpu, tests/conftest.py) compiled in bf16 on CUDA, on the GPU machine's own torch and
# triton (no venv: the lock pins the CPU pair). Each tile the autotuner may pick is checked by test_gpu_tiles.py.
test-gpu:
	MMATTN_TEST_GPU=1 MMATTN_AUTOTUNE=0 $(PYTHON) -m pytest -q -ra -m gpu tests

# A fresh venv with the newest release of each dependency (what `pip install mmattn[all]` gets today), the releases
# newer than the lock printed, then the same suite.
test-latest:
	$(PYTHON) -m venv --clear $(LATEST)
	$(LPY) -m pip install -q --upgrade pip
	$(LPY) -m pip install -e ".[all,test]"
	$(LPY) $(FREEZE) > $(LATEST)/freeze.txt
	@echo "Newer than $(LOCK):"; diff <(grep -v '^#' $(LOCK)) $(LATEST)/freeze.txt | grep '^>' || echo "  nothing"
	TRITON_INTERPRET=1 $(LPY) $(PYTEST)

# The compiled paths on the oldest torch and transformers pyproject.toml admits: torch 2.11's dynamo traces less than
# the lock's (a max(default=) that only it graph-breaks on broke compiled decoding on the GPU machine). Triton 3.6's
# interpreter fails under numpy >= 2.4 (our floor), so only the compile tests that need no Triton kernel run here.
test-oldest:
	$(PYTHON) -m venv --clear $(OLDEST)
	$(OPY) -m pip install -q --upgrade pip
	$(OPY) -m pip install -q -e ".[vlm,test]" $(OLDEST_PINS)
	$(OPY) -m pytest -q -ra tests/kernels tests/vlm -k "(compile or compiled) and not triton"

# Re-pins the lock to the releases of .venv-latest once the suite has passed there.
lock: test-latest
	{ echo "# The lock: every release (direct and transitive) the suite passed with; make venv installs exactly these."; \
	  echo "# Written by make lock from .venv-latest ($$($(LPY) -c 'import platform; print("Python", platform.python_version(), platform.machine())'))."; \
	  cat $(LATEST)/freeze.txt; } > $(LOCK)

# The Gradio demo on embedded defaults (no download): http://127.0.0.1:7860
demo: venv
	$(VENV)/bin/mmattn demo --host 127.0.0.1 --port 7860

# No venv dependency: the GPU machine keeps its own torch/triton (the lock pins the CPU pair).
bench:
	$(VPY) benchmarks/block_sparse.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -path ./$(LATEST) -prune -o -path ./$(OLDEST) -prune -o -name __pycache__ -type d -exec rm -rf {} +
