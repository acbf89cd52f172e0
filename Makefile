# Set-up on a fresh machine: `make demo` and `make test` each create .venv and install what they
# need, through constraints.txt (the CPU wheel of torch): the demo the package alone, the tests
# the package with its test and ray extras (transformers, deepspeed, ray: about 2 GB more).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
DEMO_OUT ?= demo-out

.PHONY: install test demo bench bench-gpu gpu-wheels lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml constraints.txt | $(PY)
	$(VENV)/bin/pip install -q -c constraints.txt -e .
	touch $(DEMO_STAMP)

$(TEST_STAMP): pyproject.toml constraints.txt | $(PY)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,ray]'
	touch $(TEST_STAMP) $(DEMO_STAMP)

install: $(DEMO_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(DEMO_STAMP)
	$(PY) -m exporter.cli.demo --out $(DEMO_OUT)
	@echo
	@echo "To run neox-export yourself: source $(VENV)/bin/activate"

bench: $(TEST_STAMP)
	$(PY) benchmarks/run.py

bench-gpu: $(TEST_STAMP)
	$(PY) benchmarks/gpu.py

# Wheels of what the project imports beyond the GPU image's packages, for
# benchmarks/gpu_check.sh on a machine without network (Python 3.12, x86_64).
GPU_WHEELS ?= blake3 zstandard pytest-timeout
gpu-wheels: $(TEST_STAMP)
	rm -rf benchmarks/wheels
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 -d benchmarks/wheels $(GPU_WHEELS)
	du -sh benchmarks/wheels

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check exporter tests benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
