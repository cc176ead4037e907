# Two commands on a fresh machine:
#   make demo   set everything up, make synthetic product pages, build the dataset, train,
#               evaluate, register and generate on CPU (tiny config), print where to look
#   make test-all   the whole test suite (what CI runs: .ci/run)
#   make test       the fast part (no end-to-end flow runs, no servers): minutes, for the edit loop
#   make lint       ruff: lint rules and formatting (pyproject.toml), checked, nothing changed
PY := .venv/bin/python
DATA ?= data/demo
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/data/prefect
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test test-all lint

setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -r requirements.txt torch==2.13.0
	# sam2's CUDA extension cannot build without a GPU; its Python video predictor runs on CPU.
	SAM2_BUILD_CUDA=0 .venv/bin/pip install -q --no-build-isolation --no-deps sam2==1.1.0
	touch $@

demo: setup
	$(PY) -m demo --data $(DATA)

test-all: setup
	$(PY) -m pytest -q

test: setup
	$(PY) -m pytest -q -m "not slow and not server"

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
