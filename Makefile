# One target per chore. `make help` lists them.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# What ruff checks and formats.
CODE := listener tests examples bench

.DEFAULT_GOAL := help
.PHONY: help install rabbitmq postgres demo examples test test-fast bench lint format typecheck check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed ## create .venv and install the package with its dev tools

rabbitmq: ## start the local RabbitMQ if it is not answering
	@scripts/ensure-rabbitmq

postgres: ## start the local PostgreSQL if it is not answering (the database tests use it)
	@scripts/ensure-postgres

demo: install rabbitmq ## run the FileCopier example end to end against the local broker
	$(BIN)/python -m examples.file_copier.demo

examples: install rabbitmq ## run every example's demo against the local broker
	$(BIN)/python -m examples.provisioning.demo
	$(BIN)/python -m examples.web_publisher.demo
	$(BIN)/python -m examples.orders.demo

test: install rabbitmq postgres ## run the whole test suite (needs RabbitMQ)
	$(BIN)/pytest

test-fast: install ## run every test that needs no broker and is not marked slow
	$(BIN)/pytest -m "not slow and not rabbitmq"

bench: install rabbitmq ## amqp-listener against raw clients and other frameworks, ratios from one run (BENCH_ARGS="--n 2000")
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: install ## ruff lint and format check
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

format: install ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

typecheck: install ## mypy --strict on the package
	$(BIN)/mypy

check: lint typecheck test ## everything CI runs

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
