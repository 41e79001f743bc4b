# Quick start: `make demo` trains the demo VAE on built-in photos; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test test-slow clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# --resume latest: a second `make demo` continues or re-exports the first run; `make clean-demo` starts over.
demo: $(STAMP)
	$(BIN)/vaekit weights fetch lpips-alex || echo "LPIPS weights unavailable: the demo trains without the perceptual term."
	$(BIN)/vaekit train --config configs/train/demo.yaml --resume latest

clean-demo:
	rm -rf checkpoints/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m slow
