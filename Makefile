# Every target sets itself up: a fresh machine needs only Python 3 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-check lint clean

# resemblyzer (the baseline voice encoder's weights ship in its wheel) goes in with
# --no-deps: it asks for webrtcvad, which builds from source; webrtcvad-wheels, in [dev],
# is the same module prebuilt.
# torch as pip resolves it: the CPU build where the index offers it (a local wheel on our
# machines). PyPI's Linux wheel is the CUDA build (several GB): there, give PyTorch's CPU
# index, e.g. make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,web]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps resemblyzer==0.1.4
	touch $(STAMP)

# make demo SEED=1: another corpus and other initial weights (docs/results.md has 0, 1, 2)
SEED ?= 0

demo: $(STAMP)
	$(VENV)/bin/speech2face demo --seed $(SEED)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

bench: $(STAMP)
	$(PY) -m bench $(BENCH)

# Needs one CUDA GPU (bench/bench_gpu.py); fails with one line and exit 2 without one.
gpu-check: $(STAMP)
	$(PY) -m bench gpu
	! grep -q "NOT MET" bench/results/gpu.json

lint: $(STAMP)
	$(VENV)/bin/ruff check speech2face tests bench

clean:
	rm -rf $(VENV) build *.egg-info
