# Two commands on a fresh machine: `make demo` trains the embedded digits model, `make test` runs the tests.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -m "not slow and not gpu"

.PHONY: demo test test-slow test-gpu install clean

install: $(STAMP)

# torchvision from the registry pins its matching torch (a CUDA build that runs fine on the CPU); torch is never
# pinned here, so pip never takes the CPU-only wheel that torchvision cannot load (see DEVELOPERS.md).
# --no-compile: pip does not byte-compile every file of torch and its neighbours (install 156 s -> 91 s on 2 cores);
# scripts/compile_bytecode.py compiles the modules sagan imports instead (30 s), because where PYTHONDONTWRITEBYTECODE
# is set Python never keeps what it compiles and every process paid it again (`import sagan.cli` 19 s -> 8 s).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test]'
	$(BIN)/python scripts/compile_bytecode.py
	touch $(STAMP)

# The demo's training budget: configs/digits.yaml trains 1,600 iterations, which take 3-9 min on 2 cores depending on
# the host; the demo stops at 1,600 iterations or 6.5 min of training, whichever comes first, so that `make demo`
# (install about 2.5 min, start-up and the evaluations 0.5 min) ends within 10 minutes on the slowest hosts measured.
# On those it trains about 1,200 iterations, and its numbers then depend on the host's speed;
# `make demo DEMO_MAX_TIME=null` trains all 1,600 (a seed then reproduces exactly on one kind of CPU).
DEMO_MAX_TIME ?= 00:00:06:30

demo: $(STAMP)
	$(BIN)/sagan fit --config configs/digits.yaml --overwrite true --trainer.max_time $(DEMO_MAX_TIME)
	$(BIN)/sagan evaluate --ckpt outputs/digits/checkpoints/last.ckpt --num-samples 1000 --metrics fid,prc,kid,isc --floor
	$(BIN)/python scripts/digits_accuracy.py outputs/digits/checkpoints/last.ckpt

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# the CUDA paths (tests/test_gpu.py); on a machine without CUDA every test is skipped with the reason
test-gpu: $(STAMP)
	SAGAN_TEST_GPU=1 $(BIN)/python -m pytest -m gpu -rs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
