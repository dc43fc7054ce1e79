# One task runner for people and CI. Every target creates the venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup up test lint bench secrets clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[embedded,test,dev]'
	touch $@

setup: $(BIN)/.installed

up: setup
	$(BIN)/pflea up

# Lint first (CI runs `make test`, so lint is part of it); pytest exits 5 when it collects no
# test, which is not a failure of the code under test.
test: setup lint
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

lint: setup
	$(BIN)/ruff check shared services devstack tests bench
	$(BIN)/ruff format --check shared services devstack tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench

# docker compose's passwords, generated once into .env (mode 600); kept on later runs.
secrets:
	sh deploy/secrets.sh .env

clean:
	rm -rf $(VENV) .pflea .pytest_cache
