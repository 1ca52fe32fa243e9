# Two commands on a fresh Debian machine with Python 3.11:
#   make demo   - set up .venv and run the whole pipeline on a built-in sample
#   make test   - install the system packages the GUI tests need (.ci/system-packages.txt) when
#                 that needs no password, else name them; set up .venv with the test tools; run the suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first and pinned: a plain "torch" requirement may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test check-system clean

demo: $(VENV)/.installed
	$(VENV)/bin/genselfdiff demo --out out/demo

test: check-system $(VENV)/.installed-dev
	$(PY) -m pytest

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.created pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

check-system:
	@sh .ci/check-system

clean:
	rm -rf $(VENV) out build *.egg-info
