# meancache developer entry points. `make demo` and `make test` each create .venv on first use.
#
# PYTHON  interpreter used to create the virtual environment (default python3)
# VENV    where the virtual environment lives (default .venv)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meancache-installed

.PHONY: setup test demo clean

setup: $(STAMP)

# Reinstall whenever the pinned requirements or the packaging change.
$(STAMP): requirements.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests --doctest-modules meancache -q

demo: $(STAMP)
	$(PY) -m meancache.demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
