# The two commands of the README's Quick start. Each builds .venv from nothing when it is
# missing, and reinstalls the package when pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dynamics run quickstart --out .

# The suite in float64 on two worker processes (pytest-xdist; compilation dominates and is
# single-threaded), then the float32 subset (events, every flow, the quickstart in quick
# mode) in JAX's default precision, as a new user runs it.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2
	DYNAMICS_FLOAT32=1 $(VENV)/bin/python -m pytest -q -m float32 tests/test_float32.py

bench: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e ".[test,bench]"
	$(VENV)/bin/python benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet ruff
	$(VENV)/bin/ruff check dynamics studies tests benchmarks

clean:
	rm -rf $(VENV) results build dist *.egg-info
