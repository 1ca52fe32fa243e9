# Two commands on a fresh Debian machine with Python 3.11:
#   make demo   - set up .venv and run the whole pipeline on a built-in sample
#   make test   - install the system packages the GUI tests need (.ci/system-packages.txt) when
#                 that needs no password, else name them; set up .venv with the test tools; run the suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first and pinned: a plain "torch" requirement may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test check-system clean gpu-data

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

# The MoNuSeg images and masks benchmarks/paper_scale.py reads on a GPU machine, copied into
# .gpu-data/monuseg (ignored by git, 53 MiB) for the device tool to carry (docs/gpu.md).
GPU_DATA_FROM ?= ../shared/data/monuseg/train
gpu-data:
	@test -d $(GPU_DATA_FROM)/images -a -d $(GPU_DATA_FROM)/masks || \
	  { echo "No images/ and masks/ in $(GPU_DATA_FROM): make gpu-data GPU_DATA_FROM=DIR names the MoNuSeg training folder."; exit 2; }
	rm -rf .gpu-data/monuseg
	mkdir -p .gpu-data/monuseg
	cp -R $(GPU_DATA_FROM)/images $(GPU_DATA_FROM)/masks .gpu-data/monuseg/
	chmod -R u+w .gpu-data
	@du -sh .gpu-data/monuseg

clean:
	rm -rf $(VENV) out build *.egg-info
