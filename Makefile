# Set-up is part of every target: `make demo` and `make test` create .venv
# and install the pinned set (requirements/constraints.txt) when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Two test processes (pytest-xdist): most of a test's time is single-threaded
# graph building, so two of them share 2 cores about twice as fast. The slow
# and official tests keep each file in one process (module fixtures train);
# the default suite sends the tests of one `xdist_group` (which share a
# module fixture) to the same process.
WORKERS ?= 2

.PHONY: demo test test-all test-slow test-official bench clean

$(STAMP): setup.py requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test,bench,deploy]"
	touch $(STAMP)

# The three stages (pretrain -> fine-tune on 10% -> self-distill) and a
# supervised baseline on the bundled CIFAR-10 sample; prints a table.
demo: $(STAMP)
	$(PY) demo.py $(DEMO_ARGS)

# The default suite (fast tests, no ../shared needed).
test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup -m "not slow and not official" $(PYTEST_ARGS)

# Training subprocesses, multi-worker, preemption and hub tests.
test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "slow and not official" $(PYTEST_ARGS)

# The importer against checkpoints written by the official SimCLR code
# (../shared/official_simclr; these tests skip without it).
test-official: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m official $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/input_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
