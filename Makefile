# `make run` and `make test` set up .venv on first use (torch + torchvision first, from the pinned
# builds, then the project with its dev extras), then run the embedded default / the test suite.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python pipelines/full_run.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/convert_throughput.py

clean:
	rm -rf .cache
