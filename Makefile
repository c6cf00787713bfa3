# The two commands a newcomer needs: `make reproduce` and `make test`.
# Both create .venv (Python >= 3.11) if it is missing and install the package into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lamostcannon-installed

.PHONY: setup reproduce site test test-fast bench clean-data help

help:
	@echo "make reproduce   set up .venv and run notebooks 01-09 in order (mock universe by default)"
	@echo "make site        static HTML site of the executed notebooks and the claims table (build/site)"
	@echo "make test        set up .venv and run the whole test suite, notebooks included"
	@echo "make bench       speed and memory benchmarks (writes benchmarks/results/*.json)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $(STAMP)

setup: $(STAMP)

reproduce: setup
	$(BIN)/python -m lamostcannon reproduce

# The executed notebooks of `make reproduce` (build/notebooks) as HTML pages, an index and the
# claims table, in build/site/ (offline; nothing is executed again).
site: setup
	$(BIN)/python -m lamostcannon site

# Unit and integration tests first, then every notebook in order under nbval (01 writes the
# mock universe that 02-08 read; 09 reads the real spectra).
test: setup
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest --nbval --nbval-cell-timeout=1200 -p no:cacheprovider notebooks

test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

bench: setup
	$(BIN)/python -m pip install --quiet "thecannon==0.7.3"
	$(BIN)/python benchmarks/run_all.py

clean-data:
	rm -rf data/raw/* data/interim/* data/processed/* figures/*.png figures/*.pdf
