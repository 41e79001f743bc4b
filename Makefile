# Quick start: `make demo` trains the demo VAE on built-in photos (`make demo-finetune` then sharpens its
# decoder); `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo demo-finetune readme-images test test-slow clean-demo

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

# The third use: fine-tune the demo VAE's decoder (encoder frozen, latents unchanged) to sharpen it.
demo-finetune: $(STAMP)
	@test -f checkpoints/demo/vae/config.json || $(MAKE) demo
	$(BIN)/vaekit weights fetch lpips-alex || echo "LPIPS weights unavailable: the fine-tune trains without the perceptual term."
	$(BIN)/vaekit train --config configs/train/demo_finetune.yaml --resume latest

# The README's pictures (docs/images/): the demo grids and an evaluate report screenshot (needs chromium).
readme-images: $(STAMP)
	@test -f checkpoints/demo/vae/config.json || $(MAKE) demo
	@test -f checkpoints/demo-finetune/vae/config.json || $(MAKE) demo-finetune
	$(BIN)/python scripts/readme_images.py

clean-demo:
	rm -rf checkpoints/demo checkpoints/demo-finetune

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m slow
