# The two commands of the README:  make demo   and   make test
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow lint install install-dev clean

$(BIN)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

$(BIN)/.installed-dev: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) dev,app
	touch $(BIN)/.installed $@

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

demo: install
	$(BIN)/difflab demo

lint: install-dev
	$(BIN)/ruff check src tests benchmarks notebooks

test: install-dev lint
	$(BIN)/python -m pytest
	DIFFLAB_NB_FAST=1 $(BIN)/python -m pytest --nbmake --nbmake-timeout=600 notebooks

test-slow: install-dev
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
