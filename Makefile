# The README's commands. Every target installs what it needs itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Ports of the services scripts/services starts or finds; the URLs follow them unless set.
export VB_DB_PORT ?= 3306
export VB_REDIS_PORT ?= 6379
export VB_TEST_DATABASE_URL ?= mysql://vbtest:vbtest@127.0.0.1:$(VB_DB_PORT)/vb_test
export VB_TEST_REDIS_URL ?= redis://127.0.0.1:$(VB_REDIS_PORT)/15
export VB_DEMO_DATABASE_URL ?= mysql://vbtest:vbtest@127.0.0.1:$(VB_DB_PORT)/vb_demo

.PHONY: test demo lint format bench services services-stop browser screenshot venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

services:
	bash scripts/services

browser:
	bash scripts/browser

# Stops only what scripts/services started itself (services run by their packages stay up).
services-stop:
	bash scripts/services stop

test: venv services browser
	$(BIN)/pytest -q -p no:cacheprovider

# The README's picture of the dashboard, taken by its browser test.
screenshot: venv services browser
	VB_DASHBOARD_SCREENSHOT=docs/dashboard.png $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_dashboard.py -k follows_the_cluster

demo: venv services
	$(BIN)/vici-balancer demo --database-url "$(VB_DEMO_DATABASE_URL)"

lint: venv
	$(BIN)/ruff check balancer tests bench
	$(BIN)/ruff format --check balancer tests bench
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format balancer tests bench
	$(BIN)/ruff check --fix balancer tests bench

bench: venv services
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
