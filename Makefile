PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python

# Re-install (and so rebuild the extension) only when these change.
# wildcard: _core.pxd (and, early on, _core.pyx) may not exist.
INSTALL_DEPS := pyproject.toml setup.py \
	$(wildcard src/pipedream/_core.pyx) $(wildcard src/pipedream/_core.pxd) \
	$(wildcard src/pipedream/_ready.h)

.PHONY: venv test bench clean

venv: $(VENV)/.installed

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip

# Normal build isolation: pip fetches setuptools/wheel/Cython itself, so a
# fresh machine needs no pre-installed Cython.
$(VENV)/.installed: $(INSTALL_DEPS) | $(VPY)
	$(VPY) -m pip install -e '.[test,bench]'
	touch $@

test: venv
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

bench: venv
	$(VPY) -m pipedream bench $(BENCH_ARGS)

clean:
	rm -rf build/ *.egg-info src/*.egg-info $(VENV) src/pipedream/_core.c src/pipedream/*.so
