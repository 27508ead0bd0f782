# The two commands of the README's Quick start. Each builds .venv from nothing when it is
# missing, and reinstalls the package when pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV := .venv
# Extra package index for torch, empty by default: pip's own configuration decides (a
# machine with a local wheel house of the CPU build uses it). On a plain PyPI machine,
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` gets the CPU build instead
# of torch's default CUDA one (~3 GB).
TORCH_INDEX ?=
TORCH_FLAGS = $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
STAMP := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.torch
DOCS_STAMP := $(VENV)/.docs

.PHONY: demo test bench docs lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# torch for the torchdiffeq adapter's test, `make test` only (the demo does not need
# it). Where it cannot be installed the suite still runs and that test skips, saying
# why. --no-compile: byte-compiling torch's thousands of modules is more than half of
# its install, for one test that imports a few of them.
$(TORCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet --no-compile --retries 1 --timeout 30 -e ".[torch]" \
		$(TORCH_FLAGS) || echo "torch not installed: the torchdiffeq test will skip"
	touch $(TORCH_STAMP)

demo: $(STAMP)
	$(VENV)/bin/dynamics run quickstart --out .

# The suite in float64 on two worker processes (pytest-xdist; compilation dominates and is
# single-threaded), then the float32 subset (events, every flow, the quickstart in quick
# mode) in JAX's default precision, as a new user runs it, also on two workers.
# `--dist worksteal`: a worker that runs out of tests takes some queued on the other, so
# the run does not end on one worker's backlog (tests take from 0.01 s to ~20 s).
test: $(STAMP) $(TORCH_STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist worksteal
	DYNAMICS_FLOAT32=1 $(VENV)/bin/python -m pytest -q -n 2 --dist worksteal -m float32 tests/test_float32.py

bench: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e ".[test,bench]" $(TORCH_FLAGS)
	$(VENV)/bin/python benchmarks/run_all.py

# The documentation site (mkdocs.yml, docs/) into site/: mkdocs with mkdocs-material and
# the API reference generated from the docstrings by mkdocstrings. --strict fails on a
# broken link or anchor and on an API name that does not resolve; tests/test_docs.py
# runs the pages' code blocks and checks that every public name is in the reference.
$(DOCS_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet ruff
	$(VENV)/bin/ruff check dynamics studies tests benchmarks

clean:
	rm -rf $(VENV) results build dist site *.egg-info
