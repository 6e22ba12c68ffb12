#!/bin/sh
# Install everything the tests need, then run lint, type checks and the whole suite.
set -eu
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
echo "== ruff"
.venv/bin/ruff check gateway tests twisted
.venv/bin/ruff format --check gateway tests twisted
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
CI="${CI:-}" .venv/bin/python -m pytest "$@"
