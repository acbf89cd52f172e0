# Set-up on a fresh machine: `make test` and `make demo` each create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out

.PHONY: install test demo bench bench-gpu gpu-wheels lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m exporter.demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) benchmarks/run.py

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py

# Wheels of what the project imports beyond the GPU image's packages, for
# benchmarks/gpu_check.sh on a machine without network (Python 3.12, x86_64).
GPU_WHEELS ?= blake3 zstandard pytest-timeout
gpu-wheels: $(STAMP)
	rm -rf benchmarks/wheels
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 -d benchmarks/wheels $(GPU_WHEELS)
	du -sh benchmarks/wheels

lint: $(STAMP)
	$(VENV)/bin/ruff check exporter tests benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
