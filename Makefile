# Two commands on a fresh machine:
#   make quickstart   install, then train the tiny model on the embedded reasoning task (CPU, minutes)
#   make test         install, then run the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install quickstart test benchmarks clean

$(VENV)/.installed: pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/lightning-tokens fit --config configs/sft/tiny.yaml

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --nbmake tests notebooks

benchmarks: install
	$(PY) benchmarks/sft_main_job.py
	$(PY) benchmarks/memory_footprint.py

clean:
	rm -rf $(VENV) runs .pytest_cache
