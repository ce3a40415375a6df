# deployflag — `make run` sets up and serves; `make test` sets up and tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install services run test test-unit test-faults test-container faults-report lint format bench bench-pipeline bench-service bench-ab bench-fairness docs clean

install: $(STAMP)  ## virtualenv with the package and its dev tools
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

services:  ## install and start RabbitMQ on 127.0.0.1 (Debian packages)
	scripts/services.sh rabbitmq

run: install services  ## serve with SQLite in ./data and the local RabbitMQ
	DEPLOYFLAG_LOG_FORMAT=$${DEPLOYFLAG_LOG_FORMAT:-console} $(PY) -m deployflag serve

test: install  ## unit and integration tests (real RabbitMQ, PostgreSQL, SQLite, Celery)
	scripts/services.sh test-deps
	$(PY) -m pytest

test-unit: install  ## pure tests only: no services needed
	$(PY) -m pytest tests/unit

test-faults: install  ## the slow fault-injection scenarios
	scripts/services.sh test-deps
	DEPLOYFLAG_FAULTS_REPORT=1 $(PY) -m pytest -m faults tests/faults

test-container: install  ## build and run the image with podman (base image bootstrapped, cached)
	scripts/services.sh test-deps
	scripts/services.sh containers
	$(PY) -m pytest -m container tests/container

faults-report: test-faults  ## the fault table, from the last fault run
	cat benchmarks/results/faults.md

lint: install
	$(VENV)/bin/ruff check src tests benchmarks migrations
	$(VENV)/bin/ruff format --check src tests benchmarks migrations
	$(VENV)/bin/mypy src

format: install
	$(VENV)/bin/ruff format src tests benchmarks migrations
	$(VENV)/bin/ruff check --fix src tests benchmarks migrations

bench: bench-pipeline bench-service bench-ab bench-fairness  ## every benchmark; tables in benchmarks/results/

bench-pipeline: install
	$(PY) benchmarks/bench_pipeline.py

bench-service: install services
	$(PY) benchmarks/bench_service.py

bench-ab: install services  ## small requests, serve and Celery side by side in interleaved rounds
	$(PY) benchmarks/bench_ab.py celery=celery:. serve=serve:.

bench-fairness: install services
	$(PY) benchmarks/bench_fairness.py

docs: install  ## regenerate docs/settings.md from the settings class
	$(PY) -m deployflag.settings_doc > docs/settings.md

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
