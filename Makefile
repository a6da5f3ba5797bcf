# Commands on a fresh machine:
#   make quickstart   install, then train the tiny model on the embedded reasoning task (CPU, minutes)
#   make test         install the pinned versions (requirements-ci.txt), lint (ruff), check the wheel, run the whole suite
#   make test-latest  the same suite on the newest versions pyproject.toml allows (what `pip install -e .` gives)
VENV ?= .venv
LATEST_VENV ?= .venv-latest
PYTHON ?= python3
PY := $(VENV)/bin/python
# The newest torch on PyPI is a multi-GB CUDA build: the latest set keeps the pinned CPU wheel.
TORCH_PIN := $(shell grep -E '^torch==' requirements-ci.txt)
PYTEST_ARGS := -q -p no:cacheprovider --nbmake tests experiments notebooks

.PHONY: install install-latest quickstart test test-latest docs benchmarks clean

$(VENV)/.installed: pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# A fresh resolve every time (eager upgrades), so it always tests the newest releases.
install-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH_PIN)"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt

quickstart: install
	$(VENV)/bin/lightning-tokens fit --config sft/tiny

test: install
	$(VENV)/bin/ruff check .
	bash .ci/check_wheel.sh $(PY)
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

# Lint runs once, with the pinned ruff (make test): its findings do not depend on the dependency set.
test-latest: install-latest
	@echo "newest allowed versions:"; grep -iE '^(torch|lightning|torchmetrics|transformers|tokenizers|peft|bitsandbytes|jsonargparse|datasets)==' $(LATEST_VENV)/versions.txt
	OMP_NUM_THREADS=1 $(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The documentation site, into site/; a warning (a broken link, a docstring griffe cannot read) fails it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

benchmarks: install
	$(PY) -m benchmarks.sft_speed
	$(PY) -m benchmarks.quantization_memory

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs site .pytest_cache
