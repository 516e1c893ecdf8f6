# `make demo` runs the offline mini pipeline; `make test` runs the tests. Both create .venv when missing.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PYTHON) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(OFFLINE) PYTHON=$(PYTHON) SCALE=mini bash reproduce.sh

test: install
	$(OFFLINE) $(PYTHON) -m pytest -q tests

test-fast: install
	$(OFFLINE) $(PYTHON) -m pytest -q -m "not slow" tests

bench: install
	$(OFFLINE) $(PYTHON) -m bench

clean:
	rm -rf outputs .pytest_cache
