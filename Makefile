VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) sweeps/emm_search.py

test: setup   # the linter (pyproject.toml [tool.ruff]), then every test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

bench: setup   # every benchmark in bench/, figures into bench/results/ (git-ignored)
	mkdir -p bench/results
	$(PY) bench/search_efficiency.py --json bench/results/search_efficiency.json
	$(PY) bench/eval_adaptive.py --json bench/results/eval_adaptive.json
	$(PY) bench/nn.py --json bench/results/nn.json
	$(PY) bench/optimum.py --json bench/results/optimum.json
	$(PY) bench/train_step.py --json bench/results/train_step.json
	$(PY) bench/train_step.py --packed --json bench/results/train_step_packed.json
	$(PY) bench/sweep.py --preset smoke --json bench/results/sweep.json
	$(PY) bench/driver.py --points 10 100 1000 --max-trials 1500 --json bench/results/driver.json

clean:   # what setup and the tests made; never results/, runs/ or bench/results/ (what was measured)
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +
