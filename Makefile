# One command per habit; .ci/run calls the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-sqlite lint format typecheck bench chromium clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/audience-sync demo

# The console's browser tests drive the system's Chromium (Debian's `chromium` package).
chromium:
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

# Needs PostgreSQL, Redis, MariaDB and RabbitMQ on localhost (see README, "Tests").
test: install chromium
	$(BIN)/pytest

# The tests that need no server (neither PostgreSQL, Redis, MariaDB nor RabbitMQ).
test-sqlite: install chromium
	$(BIN)/pytest -m "not postgres and not redis and not mariadb and not rabbitmq"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.rules

clean:
	rm -rf $(VENV) demo-output audience_sync.db .pytest_cache .mypy_cache .ruff_cache
