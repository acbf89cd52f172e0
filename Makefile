# Set-up on a fresh machine: `make test` and `make demo` each create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out

.PHONY: install test demo bench bench-gpu lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m exporter.cli.demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) benchmarks/run.py

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py

lint: $(STAMP)
	$(VENV)/bin/ruff check exporter tests benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
