# unclip-ray: the two commands are `make demo` and `make test`; both set themselves up.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRESET ?= quick
WORKDIR ?= work/demo

.PHONY: install demo test test-fast test-multinode test-slow lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' --config-settings editable_mode=compat
	@touch $(STAMP)

demo: install
	$(VENV)/bin/unclip demo --workdir $(WORKDIR) --preset $(PRESET)

test: install  # under 20 min on a 2-core CPU without AMX: the extended tests are in test-slow
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 -m "not multinode and not extended" tests

test-slow: install  # the extended tests (~9 min on a 2-core CPU without AMX)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 -m extended tests

test-multinode: install  # multi-node Ray clusters on this machine: minutes each, not in `make test`
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 -m multinode tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" --timeout=300 tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
