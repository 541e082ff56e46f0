# The two commands of README.md. Each creates .venv and installs pinned dependencies first.
VENV ?= .venv
PY := $(VENV)/bin/python
STORAGE ?= results

.PHONY: install search report test test-fast lint
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# Main job: the embedded quickstart search (local Ray, MLflow store under results/), then its report.
search: install
	$(VENV)/bin/mae-search search --storage $(STORAGE)
	$(VENV)/bin/mae-search report $(STORAGE)/quickstart --out reports/quickstart

test: install
	$(VENV)/bin/ruff check mae_search tests benchmarks
	$(VENV)/bin/pytest --durations=30  # the slowest tests in every log: where the suite's time goes

test-fast: install
	$(VENV)/bin/pytest -m "not slow"
