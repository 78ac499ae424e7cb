# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= router.toml

.PHONY: run test test-fast check bench peers clean

$(BIN)/dicom-router: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/dicom-router  ## start the router on the example configuration (Ctrl-C stops it)
	$(BIN)/dicom-router check --config $(CONFIG)
	$(BIN)/dicom-router serve --config $(CONFIG) --log-format console

peers:  ## install DCMTK, GDCM, Orthanc and Prometheus from Debian (root or sudo)
	./scripts/install-peers.sh

test: $(BIN)/dicom-router peers  ## everything, including the DCMTK/GDCM/Orthanc interoperability tests, and the quick benchmark
	$(BIN)/pytest -q
	$(BIN)/python bench/run.py --quick --no-json

test-fast: $(BIN)/dicom-router  ## without the tests that need Debian programs
	$(BIN)/pytest -q -m "not interop"

check: $(BIN)/dicom-router
	$(BIN)/dicom-router check --config $(CONFIG)

bench: $(BIN)/dicom-router peers
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache
