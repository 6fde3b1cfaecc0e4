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

# The demo's time budget: `make demo` ends within DEMO_BUDGET_S (10 minutes) counted from when make starts, install
# included. configs/digits.yaml trains 1,600 iterations, 3-9 min on 2 cores depending on the host; the fit stops
# earlier (trainer.max_time) when the budget, less what the install took and DEMO_RESERVE_S for the fit's start-up
# and the evaluations after it (measured 45 s at 4.5 it/s, so about 70 s on the slowest 2-core hosts, 3.0 it/s),
# runs out: about 6.5-7 min of training after a 2-minute install, more on a machine where .venv exists.
# Where the budget ends the fit the numbers depend on the host's speed; `make demo DEMO_MAX_TIME=null` trains all
# 1,600 (a seed then reproduces exactly on one kind of CPU), and DEMO_MAX_TIME=00:00:06:30 sets a fixed cap.
DEMO_BUDGET_S ?= 600
DEMO_RESERVE_S ?= 75
DEMO_MAX_TIME ?= auto
DEMO_START := $(shell date +%s)

demo: $(STAMP)
	@max_time='$(DEMO_MAX_TIME)'; \
	if [ "$$max_time" = auto ]; then \
	  spent=$$(( $$(date +%s) - $(DEMO_START) )); \
	  left=$$(( $(DEMO_BUDGET_S) - $(DEMO_RESERVE_S) - spent )); \
	  if [ $$left -lt 60 ]; then \
	    echo "make demo: $$spent s went before training (install), so less than 60 s of the $(DEMO_BUDGET_S) s budget is left for it; training 60 s (set DEMO_BUDGET_S or DEMO_MAX_TIME to change this)"; \
	    left=60; \
	  fi; \
	  max_time=$$(printf '00:%02d:%02d:%02d' $$((left / 3600)) $$((left % 3600 / 60)) $$((left % 60))); \
	  echo "make demo: $$spent s so far; training for at most $$left s (trainer.max_time $$max_time) of the $(DEMO_BUDGET_S) s budget"; \
	fi; \
	echo "$(BIN)/sagan fit --config configs/digits.yaml --overwrite true --trainer.max_time $$max_time"; \
	$(BIN)/sagan fit --config configs/digits.yaml --overwrite true --trainer.max_time $$max_time
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
