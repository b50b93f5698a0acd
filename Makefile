# palmrl — `make demo` (install + the whole pipeline on the embedded data) and `make test`.
# GPU users bring their own torch build: make install TORCH_SPEC="torch==2.5.1" TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
# DeepSpeed JIT-builds its C++ ops once; keep them in the venv so a fresh venv rebuilds them
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so nothing below can pull a multi-GB CUDA build (-W ignore: torch warns that numpy, installed later, is missing)
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -W ignore -c "import torch; print(f'torch {torch.__version__}')" > $(VENV)/torch-version.txt
	echo "torch==$$($(BIN)/python -W ignore -c 'import torch; print(torch.__version__)')" > $(VENV)/constraints.txt
	# DeepSpeed and transformers at the versions CI tests (pyproject.toml [tool.palmrl.tested], the Docker image's too)
	$(BIN)/python -c "import tomllib; t = tomllib.load(open('pyproject.toml', 'rb'))['tool']['palmrl']['tested']; \
	print('\n'.join(f'{k}=={v}' for k, v in t.items() if k != 'torch'))" >> $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	# DeepSpeed JIT-compiles its CPU communication op (~30-50 s) on first use: build it now into the venv,
	# where palmrl's CLI looks (TORCH_EXTENSIONS_DIR), not in the first command (a GPU build has nothing to build here)
	$(BIN)/python -W ignore -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
	touch $@

demo: install
	$(BIN)/palmrl pipeline

test: install
	# two workers, one thread each: one runs the demo pipeline and its quality gates, the other the rest
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: install
	# two workers: 539 tests in ~45 s on 2 AVX-512 cores, ~95 s on 2 AVX2 cores
	$(BIN)/python -m pytest -q -n 2 -m unit

lint: install
	$(BIN)/ruff check palmrl scripts tests
	$(BIN)/python -m palmrl --help > /dev/null
	$(BIN)/hadolint docker/Dockerfile

bench: install
	# the reference implementation, under the same torch constraint (scripts/bench_stages.py loads only its PaLM)
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[bench]"
	$(BIN)/python scripts/bench_stages.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_ppo.py
	$(BIN)/python scripts/bench_rlhf.py
	$(BIN)/python scripts/bench_rollout_zero3.py
	$(BIN)/python scripts/bench_plan_memory.py
	$(BIN)/python scripts/bench_dedup.py
	$(BIN)/python scripts/bench_serve.py

clean:
	rm -rf runs outputs multirun wandb .pytest_cache
