# Two commands on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean golden results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/moelab demo

test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

golden: setup   # rewrite tests/golden/curves.json: MOELAB_UPDATE_GOLDEN="why" make golden
	$(PY) -m pytest -q tests/test_golden_curves.py

lint: setup
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

bench: setup
	$(VENV)/bin/moelab bench moe
	$(VENV)/bin/moelab bench peer

# Rerun every suite of docs/results with the current code, export reports and per-run data into
# docs/results/<suite>/, rewrite the generated blocks of docs/results/README.md. Needs a committed
# tree; resumes if interrupted. Measured on the shared 2-core CPU: paper-mini + experts-scaling +
# load-balance 66 min (2 suites at a time), routers 35 min alone with its runs 2 at a time
# (RESULTS_ARGS='--suites routers --compare-args "--jobs 2"'); paper-lr 32 min and paper ~80 min
# (18 runs of ~1M tokens), each alone with --compare-args "--jobs 2", on a machine shared with
# other work. RESULTS_ARGS="--suites NAME" for one.
results: setup
	$(PY) scripts/make_results.py --jobs 2 $(RESULTS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
