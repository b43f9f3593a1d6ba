# Two commands do all the set-up: `make serve` and `make test`. Each creates the virtual
# environment it needs (.venv) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on disk on this project's machines; elsewhere pip takes it from PyPI.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: serve test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(WHEELS) -e '.[test,kernels,eval]'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/vqdiff serve $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_transformer.py

clean:
	rm -rf $(VENV) .pytest_cache
