# Two entry points (README): `make bench` runs the main job, `make test` runs the tests.
# Both create .venv and install fxfuse with what they need on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxfuse-installed

.PHONY: venv bench test test-all fuzz zoo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[test,plot,progress,onnx]"
	touch $(STAMP)

venv: $(STAMP)

bench: $(STAMP)
	$(BIN)/fxfuse bench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --runslow $(ARGS)

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q --runslow tests/test_fuzz.py $(ARGS)

zoo: $(STAMP)
	$(BIN)/python benchmarks/zoo.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
