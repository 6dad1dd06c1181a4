# make demo: create .venv, install, train the tiny model on 8 fake CPU devices, generate text.
# make test: create .venv, install with test extras, run the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"

demo: install
	$(BIN)/lite-tp train configs/tiny.yaml --set mesh.tensor=4 --set mesh.data=2 --run-dir $(RUN_DIR)
	$(BIN)/lite-tp generate --run-dir $(RUN_DIR) --prompt "def " --max-new-tokens 300 --temperature 0.7

test: install-test
	$(BIN)/python -m pytest -n 2 -q --durations=10

clean:
	rm -rf $(VENV) runs .pytest_cache
