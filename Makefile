# Two entry points (README): `make bench` runs the main job, `make test` runs the tests.
# Both create .venv and install fxfuse with what they need on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxfuse-installed

.PHONY: venv bench lint test test-all fuzz mutants zoo zoo-timm clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[test,plot,progress,onnx,lint]"
	touch $(STAMP)

venv: $(STAMP)

bench: $(STAMP)
	$(BIN)/fxfuse bench $(ARGS)

# Lint (ruff) and type check (mypy, config in pyproject.toml) first, then the test suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The suite in parallel (pytest-xdist: one worker per core; test_bench's module fixture on one worker), then the
# 15 slowest tests. TEST_JOBS=0 runs it in one process.
TEST_JOBS ?= auto
PYTEST_PAR = -n $(TEST_JOBS) --dist loadgroup --durations=15

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_PAR) $(ARGS)

# Everything: the slow sweeps and the full Hypothesis budgets (--runslow).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q --runslow $(PYTEST_PAR) $(ARGS)

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q --runslow tests/test_fuzz.py $(ARGS)

# Named source mutants of the fold math, rules and checks (tests/mutants.py); fails if one survives.
mutants: $(STAMP)
	$(BIN)/python tests/mutants.py $(ARGS)

zoo: $(STAMP)
	$(BIN)/python -m benchmarks.zoo $(ARGS)

# The timm zoo (docs/zoo-timm.md): installs timm (the `zoo` extra) first; resumes from .zoo-timm-cache.jsonl.
zoo-timm: $(STAMP)
	$(BIN)/pip install -q "timm>=1.0"
	$(BIN)/python -m benchmarks.zoo_timm $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
