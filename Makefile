# Needs only python3 (>= 3.10) and make; everything else is installed into .venv.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
		|| { echo "mmattn needs Python >= 3.10 ($(PYTHON) is older)" >&2; exit 1; }
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -c constraints.txt -e ".[all,test]"
	touch $@

test: venv
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -ra tests

# The Gradio demo on embedded defaults (no download): http://127.0.0.1:7860
demo: venv
	$(VENV)/bin/mmattn demo --host 127.0.0.1 --port 7860

# No venv dependency: the GPU machine keeps its own torch/triton (constraints.txt pins the CPU pair).
bench:
	$(VPY) benchmarks/kernels.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
