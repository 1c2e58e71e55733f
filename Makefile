# One command for the demo, one for the tests; each sets itself up in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo test bench results clean

setup: $(VENV)/.installed

# torch first, pinned: on a machine without a GPU this picks the local CPU build
# instead of downloading a multi-GB CUDA one.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/fedsite simulate --out runs/demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/fedsite bench --out runs/bench

# The reference experiments behind simulations/RESULTS.md (about an hour on 2 CPU cores).
results: setup
	$(VENV)/bin/fedsite reproduce --out runs/reproduce

clean:
	rm -rf runs .fedsite
