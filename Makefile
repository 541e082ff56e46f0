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
	# Two at a time: much of an end-to-end test waits on process start-up. The test marked serial (a 2-worker DDP
	# run: its workers spin in gloo's collectives and need both cores) runs after, alone. --durations: where the
	# time goes.
	$(VENV)/bin/pytest -n 2 --dist worksteal -m "not serial" --durations=30
	$(VENV)/bin/pytest -m serial --durations=5

test-fast: install
	$(VENV)/bin/pytest -m "not slow"
