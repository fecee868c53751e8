# The two commands of the README: `make features` (main job) and `make test` (whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-mm peer-sdists features test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The OpenMMLab stack for vim.mmdet / vim.mmseg: mmcv 2.1.0 is built from source once per machine (~25 min on 2
# cores) and cached under ~/.cache/vim-backbones/wheels; later runs reuse the wheel (see tools/install_mm.py).
$(VENV)/.mm-installed: tools/install_mm.py $(VENV)/.installed
	$(BIN)/python tools/install_mm.py
	touch $@

install-mm: $(VENV)/.mm-installed

features: install
	$(BIN)/python tools/extract_features.py

# The released sources of timm (the installed version) and mamba_ssm that tests/peers runs timm's model suite and
# mamba_ssm's reference from: downloaded once (nothing is built) into ~/.cache/vim-backbones/sdists and verified.
# Fails when a download fails and nothing is cached; `make test` then requires them (no silent skip).
peer-sdists: install
	$(BIN)/python -m tests.peers.sdists

test: install install-mm peer-sdists
	VIM_REQUIRE_PEER_SDISTS=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
