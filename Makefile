# Two commands on a fresh machine: `make demo` (the main job) and `make test`. Each installs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: install demo test bench bench-compile bench-orca bench-w2 gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Compile the default model (tiny random Llama), show what the passes did, then serve staggered
# requests one iteration at a time with a live view of each batch.
demo: install
	$(BIN)/orca-compile demo

test: install
	$(BIN)/python -m pytest -q --durations=25

# docs/benchmarks.md: compile time of a 12-layer GPT-2-small-shaped model vs torch.export alone
bench-compile: install
	$(BIN)/python benchmarks/compile_time.py

# docs/benchmarks.md: workload W1, the engine against HF static and continuous batching
bench: install
	$(BIN)/orca-compile bench w1 --json benchmarks/results/w1.json

# docs/benchmarks.md: Orca's and FastServe's experiments (static, fcfs, mlfq under Poisson arrivals)
bench-orca: install
	$(BIN)/orca-compile bench orca --plot-dir docs --json benchmarks/results/orca.json

# docs/benchmarks.md: workload W2, a bfloat16 checkpoint of Qwen2.5-0.5B's shape
bench-w2: install
	$(BIN)/orca-compile bench w2 --systems engine,engine-fp32,hf-continuous,hf-continuous-fp32 \
		--json benchmarks/results/w2.json

# docs/benchmarks.md, issue 19: the CUDA path proved in one run. On a GPU machine (no venv, nothing
# fetched; the machine's own python3 holds torch, triton and transformers):
#   make gpu-check OUT=dir
# here and in CI, every section at CPU sizes with the project's venv:
#   make gpu-check ARGS=--dry-run
OUT ?= gpu-check-out
ifneq (,$(findstring --dry-run,$(ARGS)))
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py $(ARGS) $(OUT)
else
gpu-check:
	-$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .  # refused: the script links the checkout in
	$(PYTHON) benchmarks/gpu_check.py $(ARGS) $(OUT)
endif

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
