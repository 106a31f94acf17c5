# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= work

.PHONY: demo test lint bench clean constraints

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tsd demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_parse_csv.py
	$(PY) bench/bench_shard.py
	$(PY) bench/bench_loader.py
	$(PY) bench/bench_metric.py
	$(PY) bench/bench_model.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

# The exact versions the suite passed with, for the virtualenv, the cluster nodes and the image
# (Dockerfile): regenerate after changing a dependency in pyproject.toml, run `make test`, commit both.
constraints: $(STAMP)
	@{ echo "# Every package of a tested install (make constraints; README: Dependencies). pip install -c"; \
	   echo "# constraints.txt keeps the virtualenv, the cluster nodes and the image on what CI tested."; \
	   $(PY) -m pip freeze --exclude-editable --disable-pip-version-check; } > constraints.txt
