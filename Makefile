# make demo: install everything and run the embedded default experiment.
# make test: install everything, lint, and run the test suite (what CI runs).
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test

install:
	@test -d /usr/share/datasets/fashion-mnist || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	$(PYTHON) -m pip install -q -e '.[test]'

demo: install
	gossiplab run

test: install
	ruff check src tests
	ruff format --check src tests
	$(PYTHON) -m pytest -q
