# Two entry points (each creates .venv and installs the project if missing):
#   make reproduce   -- regenerate every figure in figures/ under one progress bar with an ETA, then a summary
#                       table (figures/reproduce.py): the toy figures, the digits experiment and the flow-model
#                       comparison (the digits models are shipped in digits/weights/); see README for wall times
#   make test        -- run the default test suite (excludes slow and GPU tests), one pytest-xdist worker per core
# Other targets: make test-slow, make test-gpu, make bench, make bench-t2i-cost, make lint,
#   make retrain-digits (retrain the shipped digits models in digits/weights/, ~7 min on one core).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install reproduce reproduce-toy reproduce-digits retrain-digits quick test test-slow test-gpu bench \
	bench-t2i-cost lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins torch to the CPU wheel on these machines; GPU users: install torch first, then
	# `pip install -e ".[t2i,dev]"` without the constraints file.
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q -e ".[t2i,dev]"
	touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	$(PY) -m figures.reproduce --workers 2

reproduce-toy: $(STAMP)
	$(PY) -m figures.make_all

reproduce-digits: $(STAMP)
	$(PY) -m digits.experiment --workers 2
	$(PY) -m digits.flow_experiment --workers 2 --reuse-digits runs/digits

retrain-digits: $(STAMP)
	$(PY) -m digits.pretrain --retrain-shipped
	$(PY) -m digits.pretrain_flow --retrain-shipped

quick: $(STAMP)
	$(PY) -m figures.make_all --quick

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(PY) benchmarks/bench_rollout.py
	$(PY) benchmarks/bench_estimators.py
	$(PY) benchmarks/bench_queries.py --json benchmarks/results/queries.json

bench-t2i-cost: $(STAMP)
	$(PY) benchmarks/bench_t2i_cost.py --out benchmarks/results/t2i_cost.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
