# covergate — the verbs people expect. `make run` and `make test` work on a fresh machine with only
# Python 3.11 and a C compiler: they create .venv and install everything themselves.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
DEMO   ?= .demo
LISTEN ?= 127.0.0.1:50051
WORKERS ?=

STAMP_DEPS := $(VENV)/.deps-stamp
STAMP_BUILD := $(VENV)/.build-stamp
SOURCES := $(wildcard protos/covergate/v1/*.proto fastpath/*.pyx fastpath/*.pxd fastpath/_c/*.pxi fastpath/*.h) setup.py pyproject.toml

.PHONY: run test proto compile lint bench clean install

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (or set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP_DEPS): $(PY) pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "setuptools>=77" wheel "Cython==3.3.1" "grpcio-tools>=1.66" "googleapis-common-protos>=1.63"
	$(BIN)/pip install --quiet -e '.[test,dev]' --no-build-isolation
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	$(MAKE) --no-print-directory proto
	touch $@

install: $(STAMP_BUILD)

## Generate the Python stubs from protos/ (never committed).
proto: $(STAMP_DEPS)
	$(PY) -c 'import setup; setup.generate_stubs()'

## Compile the Cython fast path in place.
compile: $(STAMP_DEPS)
	$(PY) setup.py -q build_ext --inplace

## Build, make demo data (once), serve on $(LISTEN), and print a ready-to-paste check command.
run: install
	@$(BIN)/covergate demo --data $(DEMO)/data --examples $(DEMO)/try.txt --if-missing
	@$(PY) -m service.devrun --data $(DEMO)/data --examples $(DEMO)/try.txt --listen $(LISTEN) $(if $(WORKERS),--workers $(WORKERS))

## The whole suite: unit, property, integration (real server, LMDB, Redis, OTLP receiver).
test: install
	COVERGATE_REQUIRE_EXTENSIONS=1 $(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP_DEPS)
	$(BIN)/ruff check service fastpath tests bench
	$(BIN)/ruff format --check service fastpath tests bench
	$(BIN)/mypy
	PATH=$(BIN):$$PATH $(BIN)/cython-lint --max-line-length 100 fastpath/*.pyx fastpath/*.pxd fastpath/_c/*.pxi

bench: install
	$(BIN)/pip install --quiet -e '.[bench]' --no-build-isolation
	COVERGATE_REQUIRE_EXTENSIONS=1 $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastpath/*.c fastpath/*.so covergate $(DEMO)
