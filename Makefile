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

demo: $(STAMP)
	$(BIN)/sagan fit --config configs/digits.yaml --overwrite true
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
