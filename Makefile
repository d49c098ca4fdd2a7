# make demo: install, prepare Shakespeare, train a small Llama, sample from it, evaluate it (CPU is fine)
# make test: install with the test-only oracles, run the whole test suite
#
# The virtual environment is .venv. torch==2.13.0 (the CPU wheel on CPU machines) is installed into it,
# unless the system Python already has a CUDA build of torch: then the venv sees the system packages and
# keeps that build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test install install-test clean

$(BIN)/python:
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "using the system's CUDA build of torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --disable-pip-version-check $(TORCH); \
	fi

$(VENV)/.runtime: $(BIN)/python requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(BIN)/python train.py configs/pretrain_shakespeare.py
	$(BIN)/python generate.py --ckpt out/shakespeare --prompt "ROMEO:" --num_samples 2 --max_new_tokens 100
	$(BIN)/python eval.py --ckpt out/shakespeare/ckpt/latest --task ppl

test: $(VENV)/.test
	$(BIN)/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) out data/cache .pytest_cache
