# Two commands set up and run everything on a fresh machine (Python 3.11+, no GPU needed):
#   make demo   installs fangzhi into .venv and runs the main job on the embedded defaults
#   make test   installs fangzhi with its test extras into .venv and runs the test suite
#   make min-versions   the oldest dependency versions pyproject.toml allows, on Python 3.11, in .venv-min (as CI does)
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fangzhi demo

test: install
	$(PY) -m pytest -q

min-versions:
	bash .ci/min-versions

.PHONY: install demo test min-versions
