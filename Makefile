# Two commands set everything up from a fresh clone:
#   make demo   the main job on its offline default (CLIP on the generated bilingual dataset, CPU)
#   make test   the test suite and the linters
# Each creates the project's virtual environment when it is missing and installs the project into it; running
# either again installs nothing unless pyproject.toml changed.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# pytest-xdist workers: the suite's end-to-end runs are independent processes. Each module stays on one worker
# (--dist loadscope): its module-scoped fixtures (trained runs, tiny models) are then built once, not per worker.
TEST_WORKERS ?= 2

.PHONY: demo test lint install clean-venv

demo: $(VENV)/.installed
	$(PYTHON) train.py experiment=clip_demo

test: $(VENV)/.installed-dev
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadscope
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

install: $(VENV)/.installed-dev

$(PYTHON):
	python3 -m venv $(VENV)

# The stamps are newer than pyproject.toml once its dependencies are installed.
$(VENV)/.installed: pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install -e ".[dev]"
	touch $@ $(VENV)/.installed

clean-venv:
	rm -rf $(VENV)
