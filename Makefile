.PHONY: setup test test-all lint quickstart

setup:
	bash scripts/setup.sh

# The README's test command: set up, then the default suite (unit + small real-data integration tests).
test: setup
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check src tests benchmarks

quickstart: setup
	.venv/bin/lightcrl quickstart --out runs/quickstart
