# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create .venv with a Python >= 3.12 (found by scripts/find_python.sh) if it is missing,
# install the project with its extras, and run.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $$(scripts/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pip install -q --no-deps 'recbole==1.2.1'
	$(PY) -m pallas_kernels.native
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m st_jax.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/ann.py

clean:
	rm -rf $(VENV) build *.egg-info
