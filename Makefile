# histofuse: `make demo` and `make test` create the virtual environment themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
# Models come from local files only in tests and the demo; never wait on a hub look-up.
export HF_HUB_OFFLINE := 1
# glibc's default allocator thrashes mmap/munmap under tile decoding + encoding; this keeps the
# arena (measured ~2.8x faster extraction on 2 cores, for more peak RSS; flat with slide size at the
# CPU's default batch of 32 tiles; see docs/benchmarks.md).
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 100000000000

.PHONY: install demo test test-slow bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,demo,dp]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/histofuse demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu"

bench: $(STAMP)
	$(BIN)/python scripts/bench_extract.py
	$(BIN)/python scripts/bench_models.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf runs build *.egg-info
