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
SOURCES := $(wildcard protos/covergate/v1/*.proto fastpath/*.pyx fastpath/*.pxd fastpath/*.h \
	fastpath/_c/*.pxi) setup.py pyproject.toml

.PHONY: run test test-fast proto compile lint bench clean install
.PHONY: fuzz fuzz-asan

FUZZ_SECONDS ?= 60
FUZZ_ENGINE ?= atheris
STAMP_FUZZ := $(VENV)/.fuzz-stamp
ASAN_DIR := build/asan
ASAN_FLAGS := -fsanitize=address,undefined
FUZZ_TARGET ?= fuzz
FUZZ_RUN = PYTHONPATH=tests COVERGATE_REQUIRE_EXTENSIONS=1 \
	$(PY) -m $(FUZZ_TARGET) --engine $(FUZZ_ENGINE) --seconds $(FUZZ_SECONDS)

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (or set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP_DEPS): $(PY) pyproject.toml
	@echo "make: installing covergate's dependencies into $(VENV) (the first time: 1-3 minutes) ..."
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "setuptools>=77" wheel "Cython==3.3.1" "grpcio-tools>=1.66" "googleapis-common-protos>=1.63"
	$(BIN)/pip install --quiet -e '.[test,dev]' --no-build-isolation
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(SOURCES)
	@echo "make: compiling the Cython fast path (about 30 s) ..."
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
	@$(PY) -m service.devrun --data $(DEMO)/data --examples $(DEMO)/try.txt --listen $(LISTEN) $(if $(WORKERS),--workers $(WORKERS))

## The whole suite: unit, property, integration (real server, LMDB, Redis, OTLP receiver).
test: install
	COVERGATE_REQUIRE_EXTENSIONS=1 $(BIN)/pytest -q $(PYTEST_ARGS)

## The fast subset (tests not marked slow), for the edit-test loop: under a minute.
test-fast: install
	COVERGATE_REQUIRE_EXTENSIONS=1 $(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP_DEPS)
	$(BIN)/ruff check service fastpath tests bench
	$(BIN)/ruff format --check service fastpath tests bench
	$(BIN)/mypy
	PATH=$(BIN):$$PATH $(BIN)/cython-lint --max-line-length 100 fastpath/*.pyx fastpath/*.pxd fastpath/_c/*.pxi

bench: install
	$(BIN)/pip install --quiet -e '.[bench]' --no-build-isolation
	COVERGATE_REQUIRE_EXTENSIONS=1 $(PY) -m bench $(BENCH_ARGS)

## Differential fuzzing of both gates and upb for FUZZ_SECONDS (tests/fuzz/__init__.py explains
## findings); FUZZ_ENGINE=hypothesis needs no atheris; FUZZ_ARGS go to libFuzzer (flags, inputs).
## FUZZ_TARGET=fuzz.importer fuzzes the compiled rights-file reader against the reference instead.
fuzz: install $(STAMP_FUZZ)
	$(FUZZ_RUN) $(FUZZ_ARGS)

## The same with the C gate built with AddressSanitizer and UBSan, in build/asan (the in-place
## build that `make test` uses is left alone).
fuzz-asan: install $(STAMP_FUZZ) $(ASAN_DIR)/.stamp
	COVERGATE_LIBFUZZER=$$($(PY) -c 'import atheris, glob, os; print(glob.glob(os.path.dirname(atheris.__file__) + "/core_with_libfuzzer*.so")[0])') \
	LD_PRELOAD="$(ASAN_DIR)/asan_coverage.so:$$(gcc -print-file-name=libasan.so)" \
	ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0 PYTHONMALLOC=malloc \
	$(FUZZ_RUN) --gate-c $$(ls $(ASAN_DIR)/lib/fastpath/_gate_c*.so) $(FUZZ_ARGS)

$(STAMP_FUZZ): $(STAMP_DEPS)
	$(BIN)/pip install --quiet -e '.[fuzz]' --no-build-isolation
	touch $@

$(ASAN_DIR)/.stamp: $(STAMP_FUZZ) $(SOURCES) tests/fuzz/asan_coverage.c
	CFLAGS="$(ASAN_FLAGS) -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g" \
	LDFLAGS="$(ASAN_FLAGS)" \
	$(PY) setup.py -q build_ext --force --build-lib $(ASAN_DIR)/lib --build-temp $(ASAN_DIR)/tmp
	gcc -shared -fPIC -O2 -o $(ASAN_DIR)/asan_coverage.so tests/fuzz/asan_coverage.c -ldl
	touch $@

clean:
	rm -rf build *.egg-info fastpath/*.c fastpath/*.so covergate $(DEMO)
