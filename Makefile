# Two entry points: `make demo` and `make test`. Each creates .venv from the pinned requirements first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench bench-large dist clean sam-validate

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==23.2.1

# The stamps re-install when a requirements file changes.
$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/gradshard demo

test: $(VENV)/.dev
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

# The inner loop: lint and the in-process tests (no worker processes, servers or slow cases), stopping at the first failure.
test-fast: $(VENV)/.dev
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -x -m "not slow and not integration" $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(VENV)/.dev
	$(BIN)/python bench/aggregate.py

bench-large: $(VENV)/.dev
	$(BIN)/python bench/aggregate.py --large

# The SAM application of `gradshard deploy sam`, validated by the AWS SAM CLI (pinned, in its own virtualenv: it
# is large and only this check needs it). Stops before `sam build`, which needs Docker and an AWS account.
SAM_VENV ?= .sam-venv
sam-validate: $(VENV)/.runtime
	test -x $(SAM_VENV)/bin/sam || (python3 -m venv $(SAM_VENV) && $(SAM_VENV)/bin/pip install --quiet aws-sam-cli==1.170.0)
	rm -rf build/sam && $(BIN)/gradshard deploy sam --out build/sam
	cd build/sam && SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION=us-east-1 ../../$(SAM_VENV)/bin/sam validate --lint

# The wheel, dist/gradshard-<version>-py3-none-any.whl (pip builds it with setuptools in an isolated environment).
dist: | $(BIN)/activate
	rm -f dist/gradshard-*.whl
	$(BIN)/pip wheel --no-deps --quiet -w dist .

clean:
	rm -rf $(VENV) $(SAM_VENV) .pytest_cache .mypy_cache .hypothesis build dist
